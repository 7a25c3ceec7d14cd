"""Benchmark workloads behind `treedistill bench` (the command and its printing: commands/bench.py)."""
