"""A training run whose data and run folder live in an S3 bucket (moto_server on 127.0.0.1, see fixtures_s3):
prepare_data writes the shards there, Ray Data streams them from it, Ray Train persists checkpoints to it; a worker
is SIGKILLed after the first checkpoint reaches the bucket, the run resumes from the bucket and exports there,
and no local run folder is created.

The run is DeepSpeed ZeRO-3 (parameter and optimizer shards per rank, an EMA export gathered from them), which
makes it also the suite's worker-kill test of a sharded strategy's restore through Ray Train (FSDP2's is in
test_stage2; ZeRO-1/2's checkpoint save/load/exact resume runs on 2 gloo ranks in test_strategies). The job
starts its own local Ray: after such kills a later Ray call of the pytest driver hung in ``internal_kv_put``
(Ray 2.60, cause not isolated), so the fault stays out of the suite's shared cluster.
"""

from __future__ import annotations

import json
import math
import re
import uuid

import psutil
import pytest
import torch

from cadiff import storage
from cadiff.models.registry import build_model
from cadiff.runtime.exports import load_export
from cadiff.testing.data import prepare_sim
from cadiff.testing.faults import (
    job_command,
    metric_records,
    metric_steps,
    registered_step,
    run_with_worker_kill,
)


@pytest.mark.slow
@pytest.mark.ray
def test_zero3_bucket_run_resumes_from_the_bucket_after_a_worker_kill(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prefix = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    data, runs = f"{prefix}/data", f"{prefix}/runs"
    prepare_sim(data)
    max_steps, ckpt_every = 6, 2
    run = f"{runs}/train_ae/r1"
    cmd = job_command("train_ae", "experiment=ae_tiny", "strategy=deepspeed_zero3", "trainer.num_workers=2",
                      "trainer.cpus_per_worker=0.5", f"data.root={data}", f"out_root={runs}", "run_name=r1",
                      f"trainer.max_steps={max_steps}", "trainer.log_every=1", f"trainer.val_every={max_steps}",
                      f"trainer.ckpt_every={ckpt_every}", "trainer.max_failures=1", "trainer.media_every=0",
                      "ema.decay=0.9")
    # metrics reach the bucket with each checkpoint: kill once the first one is registered there
    done, killed = run_with_worker_kill(cmd, tmp_path, run, timeout_s=540,
                                        ready=lambda: 0 < registered_step(run) < max_steps)
    out, err = done.stdout, done.stderr
    assert killed is not None, f"no worker was killed (registered {registered_step(run)}): {err[-3000:]}"
    assert done.returncode == 0, out + err[-3000:]
    assert out.splitlines()[-1].startswith(f"cadiff train_ae: ok step={max_steps} ")
    assert out.splitlines()[-1].endswith(f"-> {run}")
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    # one restart, from a registered checkpoint at or after the one seen at the kill (metrics.jsonl reaches the
    # bucket with checkpoints, so steps logged after the last one are not in it twice: the log line tells)
    resumed = [int(m.group(1)) for m in re.finditer(r"resumed from \S+ at step (\d+)", out + err)]
    assert len(resumed) == 1, f"expected one resume: {resumed} {err[-3000:]}"
    assert resumed[0] >= killed["checkpoint"] > 0 and resumed[0] % ckpt_every == 0, (resumed, killed)
    losses = {int(r["step"]): r["loss"] for r in metric_records(run) if "loss" in r}
    assert sorted(losses) == list(range(1, max_steps + 1)) and all(math.isfinite(v) for v in losses.values()), losses
    steps = metric_steps(run)
    assert steps[-1] == max_steps and steps.count(1) == 1, f"restarted from scratch: {steps}"
    assert registered_step(run) == max_steps
    snapshot = json.loads(storage.read_text(f"{run}/checkpoints/checkpoint_manager_snapshot.json"))
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == f"step_{max_steps:08d}"
    assert "deepspeed" in storage.listdir(f"{run}/checkpoints/step_{max_steps:08d}"), "no DeepSpeed checkpoint persisted"
    with storage.mirrored(f"{run}/export") as export:
        state, model_cfg, meta = load_export(export.local / "model.pt")
    assert meta["step"] == max_steps and all(torch.isfinite(v).all() for v in state.values())
    build_model(model_cfg).load_state_dict(state)  # strict: every parameter gathered from its shards
    assert {"config.yaml", "run.json", "data_info.json", "metrics.jsonl"} <= set(storage.listdir(run))
    assert not (tmp_path / "outputs").exists(), "a local run folder was created"
    assert list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())
