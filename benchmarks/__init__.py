"""Offline benchmarks (not part of the package or the test suite); results go to benchmarks/results/."""
