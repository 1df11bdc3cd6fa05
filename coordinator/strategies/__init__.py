"""The strategies' server halves: one module per strategy and the one registry
(:mod:`coordinator.strategies.registry`).
"""
