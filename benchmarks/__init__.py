"""Benchmarks of the library, run from the repository root: ``python -m benchmarks.<name>`` (README.md)."""
