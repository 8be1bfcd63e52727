"""Tiny prepared data for tests and benchmarks: simulated movies through the real ``prepare_data``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cadiff.config import compose
from cadiff.data.prepare import prepare_data
from cadiff.data.simulate import simulate_movie

# ../shared/data/real next to the checkout (override with CADIFF_REAL_DATA)
REAL_DATA = Path(os.environ.get("CADIFF_REAL_DATA", Path(__file__).resolve().parents[3] / "shared" / "data" / "real"))
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


def prepare_sim(out: Path, *extra: str) -> dict[str, Any]:
    """Run prepare_data on tiny simulated movies into ``out`` (4 recordings x 5 clips of 17x32x32)."""
    return prepare_data(compose("prepare_data", [*SIM_DATA_OVERRIDES, f"out={out}", *extra]))


def log_scaled_movie(frames: int = 64, size: int = 48, seed: int = 0) -> Any:
    """A processed float32 movie ``[frames, size, size]`` without a photon signature: log-compressed photons of
    the default simulator, whose noise falls as the level rises (a negative photon-transfer slope)."""
    movie, truth = simulate_movie(frames=frames, height=size, width=size, seed=seed)
    return np.log1p(np.maximum(movie.data.astype(np.float32) - truth.offset, 0.0)).astype(np.float32)
