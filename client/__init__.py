"""A site: the Flower ClientApp and the local DP-SGD training and evaluation it runs."""
