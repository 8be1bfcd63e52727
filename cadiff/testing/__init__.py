"""Helpers the test suite and the benchmarks share: the bad-input matrix, fault injection, tiny data."""
