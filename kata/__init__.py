"""Kata Containers in Python: containers that run inside their own lightweight VM."""

__version__ = "0.1.0"
