"""Fault tolerance on a real local Ray cluster: the driver killed or interrupted (SIGKILL, SIGTERM, SIGINT) and
re-run, a damaged registered checkpoint, a crash mid-checkpoint, and a shard corrupted in the middle of a stream.
(Ray Train workers SIGKILLed mid-run: test_object_storage, ZeRO-3; test_stage2, FSDP2.)

Faults are injected from outside, like a real failure (:mod:`cadiff.testing.faults`): a watcher thread reads
the run folder and signals processes that descend from this test (never anyone else's).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cadiff.data import pipeline
from cadiff.errors import CadiffError, DataError
from cadiff.runtime.exports import load_export
from cadiff.testing.faults import (
    corrupt_payload,
    damage_latest_and_rerun,
    interrupt_job,
    job_command,
    job_env,
    local_complete_step,
    metric_steps,
    registered_step,
    restarts_since,
    resumed_from,
    run_twice_at_once,
)
from cadiff.train.checkpoint import verify_checkpoint

RUN_ARGS = ["experiment=ae_tiny", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5", "trainer.log_every=1",
            "ema.decay=0.9"]


def finished(run_dir: Path) -> dict:
    """What a finished run left: its logged steps and its export's step, finiteness and keys."""
    state, model_cfg, meta = load_export(run_dir / "export" / "model.pt")
    return {"steps": metric_steps(run_dir), "export_step": meta["step"], "state": state, "model_cfg": model_cfg}


def assert_finished(record: dict, max_steps: int) -> None:
    steps = record["steps"]
    assert steps[-1] == max_steps and steps.count(1) == 1, f"run did not finish or restarted from scratch: {steps}"
    assert record["export_step"] == max_steps
    assert record["state"] and all(torch.isfinite(v).all() for v in record["state"].values())


def assert_ok(proc: subprocess.CompletedProcess, job: str, max_steps: int) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith(f"cadiff {job}: ok step={max_steps} ")


# ---------------------------------------------------------------------------------------------------------
# worker failure


# Ray Train workers SIGKILLed mid-run and restored from the latest registered checkpoint by a new worker group:
# ZeRO-3 with its run folder in a bucket (test_object_storage), FSDP2 (test_stage2). DDP's restore of the same kind
# of checkpoint is what the driver re-runs below resume from. Each such job starts its own local Ray: after such
# kills a later Ray call of the pytest driver hung in ``internal_kv_put`` (Ray 2.60, cause not isolated).


# ---------------------------------------------------------------------------------------------------------
# one DDP run folder through three job runs: the driver SIGKILLed, the same command SIGTERMed, then the newest
# registered checkpoint damaged and the same command run to the end

CHAIN_STEPS = 8


@pytest.fixture(scope="module")
def ddp_chain(sim_data_root, tmp_path_factory) -> dict:
    """The job starts its own local Ray: a signalled driver must not disturb the suite's shared cluster.

    Each phase records what the tests below assert on; a phase that went wrong shows in its own test.
    """
    tmp = tmp_path_factory.mktemp("ddp_chain")
    run_dir = tmp / "train_ae" / "chain"
    env = job_env()
    cmd = job_command("train_ae", *RUN_ARGS, "strategy=ddp", f"data.root={sim_data_root}", f"out_root={tmp}",
                      "run_name=chain", f"trainer.max_steps={CHAIN_STEPS}", "trainer.val_every=8", "trainer.ckpt_every=2")

    chain: dict = {}
    proc, seen = interrupt_job(cmd, tmp, run_dir, signal.SIGKILL, registered_step, env=env)
    chain["kill"] = {"proc": proc, "seen": seen, "good": registered_step(run_dir), "steps": metric_steps(run_dir),
                     "lock": (run_dir / ".cadiff.lock").exists(), "export": (run_dir / "export").exists()}

    def newer_than_kill(d: Path) -> int:  # the SIGTERM waits for a checkpoint the first re-run registered
        step = registered_step(d)
        return step if step > chain["kill"]["good"] else 0

    proc, seen = interrupt_job(cmd, tmp, run_dir, signal.SIGTERM, newer_than_kill, env=env)
    good = registered_step(run_dir)
    latest = run_dir / "checkpoints" / f"step_{good:08d}"
    intact = None
    try:
        verify_checkpoint(latest)  # what the SIGTERMed run registered last is complete, before it is damaged below
    except CadiffError as exc:
        intact = str(exc)
    chain["term"] = {"proc": proc, "seen": seen, "good": good, "steps": metric_steps(run_dir), "intact": intact,
                     "export": (run_dir / "export").exists()}
    chain["damaged"] = damage_latest_and_rerun(cmd, tmp, run_dir, "tensor_data", env=env, latest=latest)
    chain["damaged"]["finished"] = finished(run_dir) if chain["damaged"].get("exit_code") == 0 else None
    chain["damaged"]["registered"] = registered_step(run_dir)
    chain["damaged"]["kept"] = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    return chain


@pytest.mark.slow
@pytest.mark.ray
def test_driver_sigkill_then_rerun_resumes(ddp_chain):
    """SIGKILL of the driver (no handler runs, no lock released, its local Ray orphaned): the re-run takes over
    the stale run lock and resumes from the last registered checkpoint."""
    first, seen, good = ddp_chain["kill"]["proc"], ddp_chain["kill"]["seen"], ddp_chain["kill"]["good"]
    assert seen.get("checkpoint", 0) > 0, f"never reached a registered checkpoint: {first.stdout}{first.stderr[-3000:]}"
    assert first.returncode == -signal.SIGKILL, (first.returncode, first.stdout, first.stderr[-3000:])
    assert ddp_chain["kill"]["lock"], "a SIGKILLed driver cannot release its run lock"
    assert not ddp_chain["kill"]["export"]
    assert good >= seen["checkpoint"]
    # the re-run (SIGTERMed later, below) took the lock over and went on from `good`
    term_steps = ddp_chain["term"]["steps"]
    assert term_steps[-1] > ddp_chain["kill"]["steps"][-1] or ddp_chain["term"]["seen"].get("checkpoint", 0) > good, (
        ddp_chain["term"]["proc"].stdout, ddp_chain["term"]["proc"].stderr[-3000:])
    restarts = restarts_since(ddp_chain["kill"]["steps"], term_steps)
    assert restarts in ([good], []), f"re-run did not resume from step {good}: {term_steps}"


@pytest.mark.slow
@pytest.mark.ray
def test_driver_sigterm_stops_cleanly_and_leaves_a_complete_checkpoint(ddp_chain):
    """SIGTERM of the driver: Ray Train's graceful abort, exit 130 with one line, no orphans, no export, and the
    newest registered checkpoint complete (its sha256 manifest verifies); the next run resumes (test below)."""
    first, seen, good = ddp_chain["term"]["proc"], ddp_chain["term"]["seen"], ddp_chain["term"]["good"]
    assert seen.get("checkpoint", 0) > 0, f"never reached a new registered checkpoint: {first.stdout}{first.stderr[-3000:]}"
    lines = [line for line in first.stdout.splitlines() if line.startswith("cadiff train_ae:")]
    assert first.returncode == 130 and lines == ["cadiff train_ae: error: interrupted; re-run the same command to resume"], (
        first.returncode, first.stdout, first.stderr[-3000:])
    assert not seen["survivors"], f"processes outlived the interrupted driver: {seen['survivors']}"
    assert not ddp_chain["term"]["export"]
    assert good >= seen["checkpoint"]  # a checkpoint may still have registered during the graceful abort
    assert ddp_chain["term"]["intact"] is None, ddp_chain["term"]["intact"]


@pytest.mark.slow
@pytest.mark.ray
def test_damaged_latest_registered_checkpoint_is_set_aside_and_the_rerun_resumes_the_previous(ddp_chain):
    """DDP: 4 KiB inside model.pt of the newest registered checkpoint (the SIGTERMed run's) zeroed at equal size
    (it would load), then the same command again.

    The re-run's driver finds it by its sha256, sets it aside and drops it from Ray Train's record before the
    controller reads it; the workers verify the previous one and resume it, run to the end and export; Ray
    Train's retention runs on.
    """
    seen, good = ddp_chain["damaged"], ddp_chain["term"]["good"]
    damaged, previous = f"step_{good:08d}", good - 2
    assert seen["damaged"] == damaged, seen
    assert seen["exit_code"] == 0, seen["stdout_tail"] + seen["stderr_tail"]
    assert seen["line"].startswith(f"cadiff train_ae: ok step={CHAIN_STEPS} "), seen
    assert seen["resumed_from"] == [previous] and seen["set_aside"] == [f".corrupt_{damaged}"], seen
    assert any("model.pt fails its sha256 check" in line for line in seen["warnings"]), seen["warnings"]
    assert seen["registered"] == CHAIN_STEPS
    assert seen["kept"] == [f"step_{CHAIN_STEPS - 2:08d}", f"step_{CHAIN_STEPS:08d}"]
    assert_finished(seen["finished"], CHAIN_STEPS)


def test_driver_sigint_single_strategy_then_crash_mid_checkpoint_then_rerun(sim_data_root, tmp_path):
    """strategy=single (no Ray): Ctrl-C between checkpoints, a half-written newer checkpoint, then resume."""
    max_steps = 16
    run_dir = tmp_path / "train_ae" / "single"
    cmd = job_command("train_ae", "experiment=ae_tiny", "strategy=single", "trainer.num_workers=1", "trainer.log_every=1",
                      "trainer.ckpt_every=4", "trainer.val_every=16", f"trainer.max_steps={max_steps}",
                      "trainer.threads_per_worker=1", f"data.root={sim_data_root}", f"out_root={tmp_path}", "run_name=single")
    first, seen = interrupt_job(cmd, tmp_path, run_dir, signal.SIGINT, local_complete_step, timeout_s=200)
    assert seen.get("checkpoint", 0) > 0, first.stdout + first.stderr[-3000:]
    assert first.returncode == 130, (first.returncode, first.stdout, first.stderr[-3000:])
    assert first.stdout.splitlines() == ["cadiff train_ae: error: interrupted; re-run the same command to resume"]
    good = local_complete_step(run_dir)
    assert good >= seen["checkpoint"] and not (run_dir / "export").exists()

    # a crash while writing the next checkpoint: a temp folder with a truncated model file and no COMPLETE marker
    partial = run_dir / "checkpoints" / f".tmp_step_{good + 4:08d}"
    partial.mkdir()
    full = (run_dir / "checkpoints" / f"step_{good:08d}" / "model.pt").read_bytes()
    (partial / "model.pt").write_bytes(full[: len(full) // 3])
    assert local_complete_step(run_dir) == good

    second = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    steps = metric_steps(run_dir)
    # resumed at good + 1 (no step goes back when the interrupt came right after checkpoint `good`)
    assert resumed_from(steps) in ([good], []), f"did not resume from step {good}: {steps}"
    assert not partial.exists(), "the half-written checkpoint was not cleaned up"
    assert_finished(finished(run_dir), max_steps)


def test_two_runs_of_one_run_name_at_once_the_second_is_refused_and_the_first_finishes(sim_data_root, tmp_path):
    """The same command started again while the run trains (strategy=single, no Ray): the second exits 2 with one
    line naming the first's process before it writes anything; the first runs on undisturbed: each step logged
    once, in order, its checkpoints and export written."""
    max_steps = 24  # ~10 s of training after the first logged step: the second command needs ~3 s to start
    run_dir = tmp_path / "train_ae" / "twice"
    cmd = job_command("train_ae", "experiment=ae_tiny", "strategy=single", "trainer.num_workers=1", "trainer.log_every=1",
                      "trainer.ckpt_every=12", f"trainer.val_every={max_steps}", f"trainer.max_steps={max_steps}",
                      "trainer.threads_per_worker=1", f"data.root={sim_data_root}", f"out_root={tmp_path}", "run_name=twice")
    first, second, seen = run_twice_at_once(cmd, tmp_path, run_dir)
    assert seen.get("first_alive_after_second"), (seen, first.stdout, first.stderr[-3000:])
    assert second.returncode == 2, (second.returncode, second.stdout, second.stderr[-3000:])
    lines = second.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cadiff train_ae: error: training run "), lines
    assert f"'{run_dir}' is in use by process {seen['pid']} on " in lines[0], lines
    assert "Traceback" not in second.stderr
    assert_ok(first, "train_ae", max_steps)
    assert metric_steps(run_dir) == list(range(1, max_steps + 1)), "the second run wrote into the first one's metrics"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000012", "step_00000024"]
    assert_finished(finished(run_dir), max_steps)
    assert not (run_dir / ".cadiff.lock").exists()


# ---------------------------------------------------------------------------------------------------------
# corrupt shard found mid-stream


def _data_cfg(mode: str):
    from omegaconf import OmegaConf

    from cadiff.config import DataConfig

    return OmegaConf.structured(DataConfig(batch_size=2, corrupt_shards=mode, flip=False))


@pytest.mark.ray
def test_corrupt_shard_mid_stream_fail_names_it_and_skip_drops_only_it(ray_cluster, sim_data_root, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(sim_data_root, root)
    bad = root / "train" / "clips-000001.tar"
    member = corrupt_payload(bad)

    # the up-front header scan passes: the corruption is only found while streaming
    dataset = pipeline.clip_dataset(root, "train", _data_cfg("fail"))
    with pytest.raises(Exception) as info:
        dataset.take_all()
    text = f"{info.value}"
    assert "clips-000001.tar" in text and member.split(".")[0] in text and "corrupt" in text, text

    rows = pipeline.clip_dataset(root, "train", _data_cfg("skip")).take_all()
    assert len(rows) == 15 - 4, "skip must drop exactly the 4 clips of the corrupt shard"
    assert all(np.isfinite(r["x"]).all() and r["x"].shape == (1, 17, 32, 32) for r in rows)


def test_corrupt_shard_mid_stream_deterministic_path_never_drops_silently(sim_data_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(sim_data_root, root)
    bad = root / "train" / "clips-000000.tar"
    corrupt_payload(bad)
    for mode in ("fail", "skip"):
        batches = pipeline.deterministic_batches(root, "train", _data_cfg(mode), rank=0, world_size=1, seed=0)
        # exact-resume mode cannot drop a sample mid-epoch without changing every later batch: it fails loudly
        with pytest.raises(DataError, match=r"clips-000000\.tar.*cannot be decoded"):
            for _ in range(8):  # one epoch of 15 clips in batches of 2 reads every shard
                next(batches)
