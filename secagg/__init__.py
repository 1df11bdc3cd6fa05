"""Secure aggregation engine (filled in below)."""
