"""Shared fixtures: one local Ray cluster per session (num_cpus=4), tiny data fixtures from fixtures_data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s and starts a preemption watcher actor per run: on a local
# test cluster (no preemption) that is ~4 s of waiting per fit; every Ray cluster the suite starts inherits this
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_pipeline", "tests.fixtures_s3"]

@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every integration test (4 logical CPUs on a 2-core box), started as
    the jobs start theirs - with the State API sweeps need - so in-process jobs and sweeps run on it."""
    import ray

    from cadiff.config import RayConfig
    from cadiff.runtime.ray import init_ray

    init_ray(RayConfig(num_cpus=4), state_api=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_finish(session):
    """In-process tests use both cores (the suite runs one test at a time); set after collection, so no test
    module's import changes it for the others."""
    import torch

    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
