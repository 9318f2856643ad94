"""ml_backend"""
