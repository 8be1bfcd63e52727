"""Data fixtures (tiny simulated movies and shards) used across the suite."""
