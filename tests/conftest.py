"""Shared fixtures: one local Ray cluster per session (num_cpus=4), tiny data fixtures from fixtures_data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s and starts a preemption watcher actor per run: on a local
# test cluster (no preemption) that is ~4 s of waiting per fit; every Ray cluster the suite starts inherits this
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_pipeline", "tests.fixtures_s3"]

TESTS = Path(__file__).resolve().parent
# integration test files that start no Ray (their jobs run in process, without a cluster)
RAY_FREE_INTEGRATION = ("test_evaluate_job.py", "test_suite2p_judge.py")
RAY_UNIT = "ray integration tests"


def xdist_unit_of(nodeid: str) -> str:
    """The pytest-xdist work unit of a test under ``make test`` (``--dist loadfile``): its file, except that every
    Ray integration test is in one unit, run one at a time by one worker: each starts Ray clusters, Train workers
    or job subprocesses that keep the two cores ~77% busy on their own."""
    file = nodeid.split("::", 1)[0]
    path = TESTS.parent / file
    if path.parent == TESTS / "integration" and path.name not in RAY_FREE_INTEGRATION:
        return RAY_UNIT
    return file


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the Ray integration tests as one unit (:func:`xdist_unit_of`). Not an
    ``xdist_group`` mark: pytest-xdist 3.8 applies those by rewriting ``item._nodeid``, which pytest 9 no longer
    reads, so the groups were split over the workers."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RayTestsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit_of(nodeid)

    return RayTestsTogether(config, log)


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
    """In-process torch work: both cores when one test runs at a time, one per pytest-xdist worker (two threads
    in each of two workers made some tests 3.5-15x slower: 13.9 -> 49.2 s, 3.4 -> 49.8 s); set after collection,
    so no test module's import changes it for the others."""
    import torch

    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
