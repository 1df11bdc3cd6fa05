"""Data an institution trains on: the built-in Shakespeare partition or its own local files,
one example per record."""
