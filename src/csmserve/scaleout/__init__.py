"""Serving from many replicas (Ray Serve, :mod:`csmserve.ray_app`): the replica's options and the
pieces a replica adds around the single server's app. Nothing here imports Ray or torch."""
