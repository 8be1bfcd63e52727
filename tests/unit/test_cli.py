"""The ``cadiff`` command: job list, per-job help from the schemas, ``--cfg job``, and the training progress line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cadiff.cli import main
from cadiff.config import JOB_SCHEMAS, schema_fields
from cadiff.jobs import JOBS
from cadiff.train.logging import ProgressLine


def test_job_table_covers_every_job_schema():
    assert set(JOBS) == set(JOB_SCHEMAS)


def test_cadiff_help_lists_every_job(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {job} " in out for job in JOBS)
    assert main([]) == 2  # no job: the same listing, as a usage error
    assert main(["nope"]) == 2 and "unknown job 'nope'" in capsys.readouterr().out


@pytest.mark.parametrize("job", list(JOBS))
def test_job_help_lists_every_option_and_group_and_starts_nothing(job, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([job, "--help"]) == 0
    out = capsys.readouterr().out
    for key in schema_fields(JOB_SCHEMAS[job]):
        assert f"\n  {key}: " in out, f"{job} --help lacks {key}"
    assert not any(tmp_path.iterdir()), "--help wrote files"


def test_job_help_shows_types_defaults_comments_and_groups(capsys):
    main(["train_ae", "--help"])
    out = capsys.readouterr().out
    assert "strategy: ddp, deepspeed_zero1, deepspeed_zero2, deepspeed_zero3, fsdp2, single" in out
    assert "  trainer.max_steps: int = 1000" in out
    assert "  trainer.stop_at_step: int | null = null  # end this session at that step" in out
    # a comment written on the lines above a field describes it too
    assert "  trainer.compile: str = 'none'  # torch.compile placement" in out


@pytest.mark.parametrize("job", list(JOBS))
def test_cfg_job_prints_the_composed_config(job, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([job, "--cfg", "job", "verbose=true"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["verbose"] is True and not any(tmp_path.iterdir())
    assert {key.split(".")[0] for key in schema_fields(JOB_SCHEMAS[job])} == set(printed)


def test_job_script_help_through_a_real_interpreter(tmp_path):
    from cadiff.testing.bad_inputs import REPO

    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_ae.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "trainer.max_steps: int = 1000" in proc.stdout, proc.stderr[-2000:]


def test_progress_line_has_step_loss_rate_elapsed_and_eta():
    line = ProgressLine(100)
    first = line.format({"step": 10, "loss": 0.5, "samples_per_s": 12.0})
    assert first.startswith("step 10/100 | loss 0.5000 | 12 samples/s | elapsed")
    later = line.format({"step": 20, "loss": 0.25, "val_loss": 0.3})
    assert "step 20/100" in later and "val 0.3000" in later and "ETA" in later and "nan" not in later


def test_progress_heartbeat_after_a_quiet_stretch(monkeypatch):
    """Slow steps still give a line every heartbeat_s, in the form make demo echoes."""
    from cadiff.demo import PROGRESS

    clock = [100.0]
    monkeypatch.setattr("cadiff.train.logging.time.monotonic", lambda: clock[0])
    line = ProgressLine(100, heartbeat_s=20)
    line.format({"step": 5, "loss": 1.0})
    clock[0] = 115.0
    assert line.heartbeat(6) is None
    clock[0] = 125.0
    beat = line.heartbeat(7)
    assert beat == "step 7/100 | elapsed 25s ETA 775s" and PROGRESS.search(beat)
    assert line.heartbeat(8) is None  # a heartbeat starts a new quiet stretch


def test_progress_heartbeat_thread_ends_with_the_training_loop(caplog):
    """The background beat covers long validation/checkpoint phases, and stops once the loop drops its line."""
    import logging
    import time

    caplog.set_level(logging.INFO, logger="cadiff.train.logging")
    line = ProgressLine(10, heartbeat_s=0.05)
    thread = line.start_heartbeat(lambda: 3, tick_s=0.02)
    deadline = time.monotonic() + 20
    while not any(r.getMessage().startswith("step 3/10 | elapsed") for r in caplog.records):
        assert time.monotonic() < deadline, "no heartbeat line"
        time.sleep(0.02)
    del line
    thread.join(timeout=5)
    assert not thread.is_alive()
