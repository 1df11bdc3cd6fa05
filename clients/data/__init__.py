"""Data an institution trains on: the built-in Shakespeare partition."""
