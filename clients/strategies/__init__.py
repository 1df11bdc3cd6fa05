"""The strategies' client halves: one module per strategy (its config, layout and learner) and
the one registry (:mod:`clients.strategies.registry`).
"""
