"""Data fixtures (tiny simulated movies and shards) used across the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadiff.testing.data import REAL_DATA, prepare_sim


@pytest.fixture(scope="session")
def sim_movie():
    """A tiny simulated movie and its ground truth: ``(Movie [60, 32, 32] uint16, GroundTruth)``."""
    from cadiff.data.simulate import simulate_movie

    return simulate_movie(preset="default", frames=60, height=32, width=32, seed=0)


@pytest.fixture(scope="session")
def sim_data_root(tmp_path_factory) -> Path:
    """Prepared tiny clip shards: 15 train clips (3 recordings) + 5 val clips (1 recording), 17x32x32 uint16."""
    root = tmp_path_factory.mktemp("sim_data") / "sim"
    prepare_sim(root)
    return root


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """``shared/data/real`` (skips the test when the folder is absent)."""
    if not REAL_DATA.is_dir():
        pytest.skip("shared/data/real not present")
    return REAL_DATA
