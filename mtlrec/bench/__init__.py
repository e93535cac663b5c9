"""Helpers shared by the benchmark scripts under benchmarks/."""
