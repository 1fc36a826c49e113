"""Benchmarks against runc (run each as a script: python bench/NAME.py)."""
