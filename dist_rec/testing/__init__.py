"""Helpers shared by tests and benchmarks (random problems, process harness)."""
