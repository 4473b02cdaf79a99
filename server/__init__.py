"""The coordinator: the Flower ServerApp, FedAvg with per-site privacy tracking, results."""
