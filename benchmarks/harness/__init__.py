"""Pieces of the side-by-side benchmark driven by benchmarks/run.py."""
