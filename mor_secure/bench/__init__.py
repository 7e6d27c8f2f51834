"""Benchmarks behind their own commands (``mor-secure bench ...``); never part of the test suite."""
