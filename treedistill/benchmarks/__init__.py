"""Benchmark workloads run by `treedistill bench`: each module times one kind of work."""
