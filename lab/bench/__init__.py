"""Benchmarks: `python -m lab.bench NAME`; the last line of output is one JSON object."""
