"""Benchmarks (not tests): each ``python -m benchmarks.NAME [--quick]`` prints a short table and
writes ``benchmarks/results/NAME.json``. See ``benchmarks/README.md``."""
