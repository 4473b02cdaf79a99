"""The pure core of dpfedseg: configuration, data, sites, model, metrics and privacy.

Nothing here imports Flower types, ``client``, ``server`` or ``simulations``.
"""
