"""Local DP training: one (DP-)SGD loop, evaluation, and the Gaussian releases outside it."""
