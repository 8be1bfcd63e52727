"""A training run whose data and run folder live in an S3 bucket (moto_server on 127.0.0.1, see fixtures_s3):
prepare_data writes the shards there, Ray Data streams them from it, Ray Train persists checkpoints to it; a worker
is SIGKILLed after the first checkpoint reaches the bucket, the run resumes from the bucket and exports there,
and no local run folder is created."""

from __future__ import annotations

import json
import uuid

import psutil
import pytest

from cadiff import storage
from cadiff.runtime.exports import load_export
from cadiff.testing.data import prepare_sim
from cadiff.testing.faults import job_command, metric_steps, registered_step, run_with_worker_kill


@pytest.mark.slow
@pytest.mark.ray
def test_bucket_run_resumes_from_the_bucket_after_a_worker_kill(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prefix = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    data, runs = f"{prefix}/data", f"{prefix}/runs"
    prepare_sim(data)
    max_steps = 9
    run = f"{runs}/train_ae/r1"
    cmd = job_command("train_ae", "experiment=ae_tiny", "strategy=ddp", "trainer.num_workers=2",
                      "trainer.cpus_per_worker=0.5", f"data.root={data}", f"out_root={runs}", "run_name=r1",
                      f"trainer.max_steps={max_steps}", "trainer.log_every=1", "trainer.val_every=9",
                      "trainer.ckpt_every=3", "trainer.max_failures=1", "trainer.media_every=0")
    # metrics reach the bucket with each checkpoint: kill once the first one is registered there
    done, killed = run_with_worker_kill(cmd, tmp_path, run, timeout_s=540,
                                        ready=lambda: 0 < registered_step(run) < max_steps)
    out, err = done.stdout, done.stderr
    assert killed is not None, f"no worker was killed (registered {registered_step(run)}): {err[-3000:]}"
    assert done.returncode == 0, out + err[-3000:]
    assert out.splitlines()[-1].startswith(f"cadiff train_ae: ok step={max_steps} ")
    assert out.splitlines()[-1].endswith(f"-> {run}")
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == "zombie"
    resumed = [line for line in (out + err).splitlines() if "resumed from" in line]
    assert resumed, f"the restarted workers did not resume a checkpoint: {err[-3000:]}"
    steps = metric_steps(run)
    assert steps[-1] == max_steps and steps.count(1) == 1, f"restarted from scratch: {steps}"
    assert registered_step(run) == max_steps
    snapshot = json.loads(storage.read_text(f"{run}/checkpoints/checkpoint_manager_snapshot.json"))
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == f"step_{max_steps:08d}"
    with storage.mirrored(f"{run}/export") as export:
        assert load_export(export.local / "model.pt")[2]["step"] == max_steps
    assert {"config.yaml", "run.json", "data_info.json", "metrics.jsonl"} <= set(storage.listdir(run))
    assert not (tmp_path / "outputs").exists(), "a local run folder was created"
    assert list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())
