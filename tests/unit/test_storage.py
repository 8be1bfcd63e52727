"""cadiff.storage on local paths, file:// URIs and a real S3-compatible server (moto_server, see fixtures_s3):
bytes, listing, folder transfers, mirrors; data prepared into and read from a bucket; a strategy=single run whose
out_root is a bucket, resumed from it."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from cadiff import storage
from cadiff.config import compose
from cadiff.errors import ConfigError


@pytest.fixture
def s3_prefix(s3_bucket) -> str:
    """A fresh prefix in the session's bucket per test."""
    return f"{s3_bucket}/{uuid.uuid4().hex[:8]}"


def test_locations_parse_and_join():
    assert not storage.is_uri("outputs/runs") and storage.is_uri("s3://b/x") and storage.is_uri("file:///tmp/x")
    assert storage.is_remote("gs://b/x") and not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://b/runs/", "train_ae", "r1") == "s3://b/runs/train_ae/r1"
    assert storage.join("rel", "a") == Path("rel/a")
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    with pytest.raises(ConfigError, match=r"scheme 'ftp://' is not supported; expected a local path or one of s3://"):
        storage.is_uri("ftp://host/x")
    with pytest.raises(ConfigError, match="expected a local path here"):
        storage.local_path("s3://b/x")


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("out_root", "ftp://host/runs", "expected a local path or s3://..., gs://..., file://..."),
    ("out_root", "s3:///runs", r"expected s3://<bucket>\[/prefix\]"),
    ("data.root", "file://relative/data", r"expected file:// with an absolute path"),
])
def test_bad_locations_fail_at_load(key, value, expected):
    with pytest.raises(ConfigError, match=f"config key '{key}' = '{value}': {expected}"):
        compose("train_ae", ["experiment=ae_tiny", f"{key}={value}"])


def test_file_uri_round_trip_and_folder_transfer(tmp_path):
    root = f"file://{tmp_path}/store"
    storage.write_bytes(storage.join(root, "a", "b.json"), b'{"x": 1}')
    assert storage.read_text(storage.join(root, "a", "b.json")) == '{"x": 1}'
    assert storage.exists(storage.join(root, "a")) and not storage.exists(storage.join(root, "nope"))
    assert storage.listdir(root) == ["a"]
    assert not list((tmp_path / "store" / "a").glob(".*"))  # atomic write: no temp file left beside it
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"\0" * 10)
    (src / "index.json").write_text("{}")
    assert storage.upload_dir(src, root, last=("index.json",)) == ["sub/w.bin", "index.json"]
    seen = storage.local_files(src)
    (src / "index.json").write_text('{"v": 2}')
    assert storage.upload_dir(src, root, unchanged=seen) == ["index.json"]  # only what changed since ``seen``
    got = storage.download_dir(root, tmp_path / "dl", exclude=("a",))
    assert sorted(got) == ["index.json", "sub/w.bin"] and (tmp_path / "dl" / "sub" / "w.bin").read_bytes() == b"\0" * 10


def test_s3_bytes_listing_and_streaming(s3_prefix):
    key = storage.join(s3_prefix, "dir", "blob.bin")
    data = bytes(range(256)) * 64
    storage.write_bytes(key, data)
    assert storage.read_bytes(key) == data and storage.is_file(key) and storage.mtime(key) is not None
    assert storage.exists(storage.join(s3_prefix, "dir")) and not storage.is_file(storage.join(s3_prefix, "dir"))
    assert storage.listdir(storage.join(s3_prefix, "dir")) == ["blob.bin"]
    with storage.open_input(key) as fh:  # seekable: tar headers are read in place
        fh.seek(256 * 10)
        assert fh.read(4) == bytes([0, 1, 2, 3])
    with pytest.raises(FileNotFoundError, match=r"'s3://.*/dir/missing': no such object"):
        storage.read_bytes(storage.join(s3_prefix, "dir", "missing"))
    assert storage.listdir(storage.join(s3_prefix, "none")) == [] and storage.mtime(storage.join(s3_prefix, "x")) is None


def test_s3_mirror_syncs_changes_and_deletions(s3_prefix, tmp_path):
    src = tmp_path / "run"
    (src / "checkpoints" / "step_1").mkdir(parents=True)
    (src / "checkpoints" / "step_1" / "model.pt").write_bytes(b"m" * 100)
    (src / "metrics.jsonl").write_text('{"step": 1}\n')
    storage.upload_dir(src, s3_prefix)
    with storage.mirrored(s3_prefix, exclude=("checkpoints",)) as mirror:
        assert mirror.remote and sorted(p.name for p in mirror.local.iterdir()) == ["metrics.jsonl"]
        with open(mirror.local / "metrics.jsonl", "a") as fh:
            fh.write('{"step": 2}\n')
        (mirror.local / "export").mkdir()
        (mirror.local / "export" / "model.pt").write_bytes(b"e" * 7)
        assert sorted(mirror.sync()) == ["export/model.pt", "metrics.jsonl"]
        local = mirror.local
    assert not local.exists()  # the temp copy is gone
    assert storage.read_text(storage.join(s3_prefix, "metrics.jsonl")).count("step") == 2
    assert storage.is_file(storage.join(s3_prefix, "checkpoints", "step_1", "model.pt"))  # excluded: left alone
    with storage.mirrored(s3_prefix, delete=True) as mirror:
        (mirror.local / "checkpoints" / "step_1").rename(mirror.local / "checkpoints" / ".corrupt_step_1")
        mirror.sync()
    assert storage.listdir(storage.join(s3_prefix, "checkpoints")) == [".corrupt_step_1"]


def test_bucket_faults_are_one_line_errors(s3_prefix, monkeypatch):
    from cadiff.errors import DataError
    from cadiff.train.launch import planned_run

    missing = storage.join(s3_prefix, "nothing")
    cfg = compose("train_ae", ["experiment=ae_tiny", f"data.root={missing}"])
    with pytest.raises(DataError, match=f"data.root '{missing}': no index.json; run jobs/prepare_data.py out={missing}"):
        planned_run(cfg, "ae").__enter__()
    cfg = compose("train_ae", ["experiment=ae_tiny", f"out_root={s3_prefix}", "trainer.resume_from=2"])
    monkeypatch.setattr("cadiff.train.launch.resolve_run", lambda cfg, stage: _plan(cfg, s3_prefix))
    with pytest.raises(ConfigError, match=r"trainer.resume_from=2 with out_root 's3://.*': choosing a checkpoint is "
                                          "supported for local run folders only"):
        planned_run(cfg, "ae").__enter__()


@pytest.mark.slow  # pyarrow retries a refused connection for ~6 s
def test_unreachable_store_is_a_one_line_error(s3_prefix, monkeypatch):
    from cadiff.errors import StorageError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageError, match=r"'s3://.*/x': reaching the store failed \(.*Could not connect"):
        storage.exists(storage.join(s3_prefix, "x"))


def _plan(cfg, location):
    from cadiff.train.launch import RunPlan
    from cadiff.train.stage import DataInfo, get_stage

    return RunPlan(stage=get_stage("ae"), cfg=cfg, run_dir=location, model_config={},
                   data=DataInfo(root="", sample_shape=(1,), num_train_clips=1))


def test_local_mirror_is_the_folder_itself(tmp_path):
    with storage.mirrored(tmp_path / "run") as mirror:
        assert mirror.local == tmp_path / "run" and not mirror.remote and mirror.sync() == []


def test_data_prepared_into_a_bucket_is_read_from_it(s3_prefix, tmp_path, monkeypatch):
    from cadiff.data import pipeline
    from cadiff.data.shards import IndexedShards, read_index
    from cadiff.testing.data import prepare_sim

    monkeypatch.chdir(tmp_path)
    uri = storage.join(s3_prefix, "data")
    summary = prepare_sim(uri)
    assert summary["out"] == uri and list(tmp_path.iterdir()) == []  # nothing local is left
    index = read_index(uri)
    assert index["splits"]["train"]["num_clips"] == summary["num_train"]
    assert storage.is_file(storage.join(uri, index["splits"]["train"]["shards"][0]["path"]))
    cfg = compose("train_ae", ["experiment=ae_tiny", f"data.root={uri}"]).data
    x = pipeline.val_batch(uri, 2, cfg)
    assert tuple(x.shape[:2]) == (2, 1) and np.isfinite(x.numpy()).all()
    shards = IndexedShards(uri, "train", index)
    assert len(shards) == summary["num_train"] and shards[0][1].dtype == np.uint16
    shards.close()
    assert prepare_sim(uri)["out"] == uri  # a re-run finds the earlier output in the bucket and reuses it


@pytest.mark.slow
def test_object_store_run_lock_refuses_a_second_holder_and_takes_over_only_dead_ones(s3_prefix, monkeypatch):
    import socket
    import subprocess
    import sys
    import time

    lock = f"{s3_prefix}/.cadiff.lock"
    with storage.object_lock(s3_prefix, "training run", settle_s=0) as held:
        assert held == lock and json.loads(storage.read_text(lock))["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"in use by process {os.getpid()} on .*lock object {lock}"):
            with storage.object_lock(s3_prefix, "training run", settle_s=0):
                pass
        assert storage.is_file(lock), "the refused second holder must not remove the first one's lock"
    assert not storage.exists(lock)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_bytes(lock, json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}).encode())
    with storage.object_lock(s3_prefix, "training run", settle_s=0):  # stale: its process is gone
        assert json.loads(storage.read_text(lock))["pid"] == os.getpid()
    storage.write_bytes(lock, json.dumps({"host": "node-7", "pid": 1, "started_utc": "t"}).encode())
    with pytest.raises(ConfigError, match="in use by process 1 on node-7"):
        with storage.object_lock(s3_prefix, "training run", settle_s=0):
            pass
    storage.delete_file(lock)

    # two sessions at once: another one's PUT lands while this one waits to read its lock back
    def other_session_writes(_seconds: float) -> None:
        storage.write_bytes(lock, json.dumps({"host": "node-8", "pid": 2, "token": "theirs"}).encode())

    monkeypatch.setattr(time, "sleep", other_session_writes)
    with pytest.raises(ConfigError, match="in use by process 2 on node-8"):
        with storage.object_lock(s3_prefix, "training run"):
            pass
    assert json.loads(storage.read_text(lock))["token"] == "theirs", "the refused session removed the winner's lock"


def test_single_run_writes_to_and_resumes_from_a_bucket(s3_prefix, tmp_path, monkeypatch):
    """strategy=single: checkpoints, config records, metrics and the export land in the bucket; a longer re-run
    resumes from the bucket's checkpoint; no local run folder is created."""
    from cadiff.runtime.exports import load_export
    from cadiff.testing.data import prepare_sim
    from cadiff.train.launch import run_training

    monkeypatch.chdir(tmp_path)
    data = storage.join(s3_prefix, "data")
    prepare_sim(data)
    runs = storage.join(s3_prefix, "runs")

    def train(max_steps: int) -> tuple[str, str]:
        cfg = compose("train_ae", ["experiment=ae_tiny", f"data.root={data}", f"out_root={runs}", "run_name=r1",
                                   "strategy=single", "trainer.num_workers=1", f"trainer.max_steps={max_steps}",
                                   "trainer.log_every=1", "trainer.val_every=100", "trainer.ckpt_every=2",
                                   "trainer.media_every=0"])
        return run_training(cfg, "ae")

    run = storage.join(runs, "train_ae", "r1")
    with storage.object_lock(run, "training run", settle_s=0):  # another session of the run holds it
        with pytest.raises(ConfigError, match=rf"training run '{run}' is in use by process {os.getpid()} on "):
            train(2)
    summary, where = train(2)
    assert where == run and summary.startswith("step=2 ")
    assert ".cadiff.lock" not in storage.listdir(run), "the run lock outlived the run"
    assert storage.listdir(storage.join(run, "checkpoints")) == ["step_00000002"]
    summary, _ = train(4)
    assert summary.startswith("step=4 ")
    steps = [json.loads(line)["step"] for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert steps == [1, 2, 3, 4]  # resumed at 2 from the bucket, not restarted
    assert {"config.yaml", "config.1.yaml", "run.json", "data_info.json"} <= set(storage.listdir(run))
    for record in ("run.json", "run.1.json"):  # each session records where its rank ran, uploaded with the run
        workers = json.loads(storage.read_text(storage.join(run, record)))["workers"]
        assert [(w["rank"], w["device"], w["pid"]) for w in workers] == [(0, "cpu", os.getpid())], workers
    with storage.mirrored(storage.join(run, "export")) as export:
        assert load_export(export.local / "model.pt")[2]["step"] == 4
    assert list(tmp_path.iterdir()) == []  # the default out_root (./outputs) was never created
