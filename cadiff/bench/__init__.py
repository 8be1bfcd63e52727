"""Benchmark libraries (the scripts in benchmarks/ are their command lines); importable by tests."""
