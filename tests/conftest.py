"""Shared fixtures: one local Ray cluster per session (num_cpus=4), tiny data fixtures from fixtures_data."""

from __future__ import annotations

import os
import sys
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
# tests of the other integration files that start no Ray either: strategy=single jobs (in process or as a
# subprocess), sampling in process, checks that fail before any cluster starts. `_ray_free_tests_start_no_ray`
# holds each to that.
RAY_FREE_TESTS = {
    "test_fault_tolerance.py": (
        "test_driver_sigint_single_strategy_then_crash_mid_checkpoint_then_rerun",
        "test_two_runs_of_one_run_name_at_once_the_second_is_refused_and_the_first_finishes",
        "test_corrupt_shard_mid_stream_deterministic_path_never_drops_silently",
    ),
    "test_train_ae.py": (
        "test_loss_falls_and_export_has_the_model_kind",
        "test_exact_resume_single_process",
        "test_compiled_blocks_in_bf16_train_and_export_plain_weights",
        "test_a_five_frame_recording_without_photon_signature_prepares_and_trains",
    ),
    "test_stage2.py": ("test_reconstruct_mode",),
    "test_sweep.py": (
        "test_malformed_space_fails_before_any_trial",
        "test_malformed_space_cli_prints_one_line_error",
        "test_space_for_another_stage_is_rejected",
        "test_chain_config_is_checked_at_compose",
        "test_chain_stage2_override_fails_before_any_trial",
        "test_fit_concurrency_lowers_to_local_cpus",
        "test_fit_concurrency_rejects_trials_larger_than_the_local_cluster",
        "test_trial_config_uses_absolute_data_root_and_sweep_resources",
        "test_results_report_has_the_plot_and_each_trial_curves_from_its_run_folder",
    ),
    "test_autoscaling.py": ("test_fake_cluster_config_derives_from_aws_yaml",),
}
RAY_UNIT = "ray integration tests"
RAY_FIXTURES = ("ray_cluster", "ray_head", "latents_root", "stage2_run")  # fixtures that start or need Ray


def integration_file(nodeid: str) -> str | None:
    """The file name of a test directly in tests/integration, else None."""
    file = nodeid.split("::", 1)[0]
    path = TESTS.parent / file
    return path.name if path.parent == TESTS / "integration" else None


def ray_free(nodeid: str) -> bool:
    """Whether the test starts no Ray: a test outside tests/integration, in a Ray-free integration file, or named
    in :data:`RAY_FREE_TESTS` (parametrised ids included)."""
    name = integration_file(nodeid)
    if name is None or name in RAY_FREE_INTEGRATION:
        return True
    return nodeid.split("::", 1)[1].split("[", 1)[0] in RAY_FREE_TESTS.get(name, ())


def xdist_unit_of(nodeid: str) -> str:
    """The pytest-xdist work unit of a test under ``make test`` (``--dist loadfile``): every test that starts Ray is
    in one unit, run one at a time by one worker (each starts Ray clusters, Train workers or job subprocesses that
    keep the two cores ~77% busy on their own: two at once measured slower, 1116 s against 1016-1074 s); every
    other test is in its file's unit (an integration file's Ray-free tests in a unit of their own)."""
    file = nodeid.split("::", 1)[0]
    if not ray_free(nodeid):
        return RAY_UNIT
    return file if integration_file(nodeid) is None else f"{file} (no Ray)"


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the Ray tests as one unit (:func:`xdist_unit_of`), handed out first: it is the
    longest unit, and the others fill in around it. Not an ``xdist_group`` mark: pytest-xdist 3.8 applies those
    by rewriting ``item._nodeid``, which pytest 9 no longer reads, so the groups were split over the workers."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RayTestsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            if RAY_UNIT in self.workqueue:  # the queue is ordered by test count: the Ray unit goes first
                self.workqueue.move_to_end(RAY_UNIT, last=False)
            super()._assign_work_unit(node)

    return RayTestsTogether(config, log)


@pytest.fixture(autouse=True)
def _ray_free_tests_start_no_ray(request):
    """A Ray-free integration test (in a :data:`RAY_FREE_INTEGRATION` file or named in :data:`RAY_FREE_TESTS`) runs
    beside the Ray tests, so it must neither need a Ray fixture nor start Ray in this process."""
    if integration_file(request.node.nodeid) and ray_free(request.node.nodeid):
        needs = sorted(set(RAY_FIXTURES) & set(request.fixturenames))
        assert not needs, f"{request.node.nodeid} is listed as Ray-free but needs {needs}"
        ray = sys.modules.get("ray")
        before = ray is not None and ray.is_initialized()
        yield
        ray = sys.modules.get("ray")
        assert before or ray is None or not ray.is_initialized(), f"{request.node.nodeid} started Ray"
    else:
        yield


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
