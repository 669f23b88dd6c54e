"""Benchmarks: cases (op, provider, shape, pass) shared by ``colm-bench`` and ``benchmarks/``."""
