"""Benchmark scripts, a package so that ``benchmarks.<module>`` resolves here and not to the
top-level ``benchmarks`` package that opacus installs into site-packages."""
