"""Run folders: one process at a time (locks), torn metrics lines, and what a resumed session may change."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from cadiff.errors import ConfigError
from cadiff.io import LOCK_NAME, drop_torn_tail, folder_lock, read_jsonl
from cadiff.train.launch import RESUME_MAY_CHANGE


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with folder_lock(tmp_path / "run", "training run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"training run '.*run' is in use by process {os.getpid()} on"):
            with folder_lock(tmp_path / "run", "training run"):
                pass
        assert lock.exists(), "the refused second holder must not remove the first one's lock"
    assert not (tmp_path / "run").exists(), "a lock-only folder the holder created is removed with the lock"


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with folder_lock(folder, "training run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists() and (folder / "keep.txt").exists()


def test_a_lock_of_another_host_is_never_guessed_stale(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"host": "node-7", "pid": 1, "started_utc": "t"}))
    with pytest.raises(ConfigError, match="in use by process 1 on node-7"):
        with folder_lock(folder, "training run"):
            pass


def test_torn_last_metrics_line_is_skipped_and_cut_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert drop_torn_tail(path) and path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not drop_torn_tail(path)
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError):
        read_jsonl(path)  # a torn line in the middle is damage, not a crash mid-append


def test_resume_allow_list_holds_no_training_hyperparameter():
    for key in ("trainer.lr", "trainer.warmup_steps", "trainer.grad_accum", "seed", "data.batch_size", "model.",
                "strategy.", "ema."):
        assert not any(p == key or (p.endswith(".") and key.startswith(p)) for p in RESUME_MAY_CHANGE), key


def test_workers_are_recorded_in_the_newest_sessions_run_record(tmp_path):
    """Each rank's node/host/pid/device lands in run.<n>.json of the session that trained (not in run.json of
    an earlier one, nor in run.10.json's place by a string sort)."""
    from cadiff.runinfo import latest_run_record, record_run, record_workers, worker_location

    for suffix in ("", ".2", ".10"):
        record_run(tmp_path, {"seed": 1}, "train_ae", suffix=suffix)
    assert latest_run_record(tmp_path) == tmp_path / "run.10.json"
    ranks = [worker_location(1, "cpu") | {"node_id": "n1"}, worker_location(0, "cpu") | {"node_id": "n0"}]
    assert record_workers(tmp_path, ranks) == tmp_path / "run.10.json"
    info = json.loads((tmp_path / "run.10.json").read_text())
    assert [(w["rank"], w["node_id"], w["pid"]) for w in info["workers"]] == [(0, "n0", os.getpid()), (1, "n1", os.getpid())]
    assert info["job"] == "train_ae" and "workers" not in json.loads((tmp_path / "run.2.json").read_text())


def test_recording_workers_without_a_readable_run_record_names_the_file(tmp_path):
    from cadiff.errors import CadiffError
    from cadiff.runinfo import record_workers

    with pytest.raises(CadiffError, match=r"no run.json \(the driver records the run"):
        record_workers(tmp_path, [])
    (tmp_path / "run.json").write_text("[1, 2")
    with pytest.raises(CadiffError, match=r"run.json: unreadable run record .*expected the JSON object"):
        record_workers(tmp_path, [])
    assert (tmp_path / "run.json").read_text() == "[1, 2"
