"""Benchmarks: ``python -m rl.benchmarks.<name>``."""
