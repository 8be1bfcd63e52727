"""Data fixtures (tiny simulated movies and shards) used across the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data/real next to the checkout (override with CADIFF_REAL_DATA)
REAL_DATA = Path(os.environ.get("CADIFF_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
SIM_DATA_OVERRIDES = [
    "source=sim",
    "source.num_movies=4",
    "source.frames=85",
    "source.height=32",
    "source.width=32",
    "clip.frames=17",
    "clip.height=32",
    "clip.width=32",
    "clips_per_shard=4",
]


@pytest.fixture(scope="session")
def sim_movie():
    """A tiny simulated movie and its ground truth: ``(Movie [60, 32, 32] uint16, GroundTruth)``."""
    from cadiff.data.simulate import simulate_movie

    return simulate_movie(preset="default", frames=60, height=32, width=32, seed=0)


def prepare_sim(out: Path, *extra: str) -> dict:
    """Run prepare_data on tiny simulated movies into ``out`` (4 recordings x 5 clips of 17x32x32)."""
    from cadiff.config import compose
    from cadiff.data.prepare import prepare_data

    return prepare_data(compose("prepare_data", [*SIM_DATA_OVERRIDES, f"out={out}", *extra]))


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
