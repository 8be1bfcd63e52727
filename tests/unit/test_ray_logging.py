"""How jobs start Ray and what Ray prints: log levels at their sources, the State API for Ray Train's
placement-group cleaner, Ray Data's progress only for data jobs, the sweep's trial table."""

from __future__ import annotations

import logging
import os
import signal
import time
from types import SimpleNamespace

import pytest
import ray
import ray.data
import yaml

from cadiff.config import RayConfig, compose
from cadiff.errors import ConfigError
from cadiff.runtime import ray as ray_runtime
from cadiff.tune.status import TrialTable, best_trial, trial_table


@pytest.fixture
def fake_ray_init(monkeypatch):
    """Record ``ray.init`` calls instead of starting Ray; restore the Ray Data context and signal handlers."""
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_runtime, "_start_autoscaling_coordinator", lambda: calls.append("coordinator"))
    monkeypatch.setattr(ray_runtime, "_start_data_stats_actor", lambda: calls.append("stats actor"))
    context = ray.data.DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield calls
    context.enable_progress_bars, context.print_on_execution_start = saved
    signal.signal(signal.SIGTERM, handlers[0])
    signal.signal(signal.SIGINT, handlers[1])


def test_local_ray_for_training_has_the_state_api_and_quiet_logs(fake_ray_init, caplog):
    caplog.set_level(logging.INFO, logger="cadiff.runtime.ray")
    ray_runtime.init_ray(RayConfig(), state_api=True)
    call, coordinator = fake_ray_init
    # Ray Train's controller gives the autoscaling coordinator 5 s: it is running before any trainer starts
    assert coordinator == "coordinator"
    assert f"Ray dashboard: http://127.0.0.1:{call['dashboard_port']}" in caplog.text
    env = call["runtime_env"]["env_vars"]
    assert call["logging_level"] == "WARNING" and call["include_dashboard"] is True
    assert call["dashboard_host"] == "127.0.0.1"
    # every process (the placement-group cleaner included) finds this cluster's dashboard, not another local one
    assert env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{call['dashboard_port']}"
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    config = yaml.safe_load(open(env["RAY_DATA_LOGGING_CONFIG"]))
    assert config["handlers"]["console"]["level"] == "WARNING"
    context = ray.data.DataContext.get_current()
    assert context.enable_progress_bars is False and context.print_on_execution_start is False


def test_data_jobs_keep_ray_data_progress(fake_ray_init):
    ray_runtime.init_ray(RayConfig(log_level="INFO"), data_progress=True)
    (call,) = fake_ray_init
    assert "RAY_DATA_LOGGING_CONFIG" not in call["runtime_env"]["env_vars"]
    assert "RAY_API_SERVER_ADDRESS" not in call["runtime_env"]["env_vars"] and call["include_dashboard"] is False
    assert call["logging_level"] == "INFO"
    assert ray.data.DataContext.get_current().enable_progress_bars is True


def test_joining_a_cluster_sets_only_the_log_level_and_train_v2(fake_ray_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_runtime.init_ray(RayConfig(log_level="ERROR"), state_api=True)
    # Ray Data's detached stats actor starts on this driver's node, never on a worker a trial autoscaled
    assert fake_ray_init == [{"address": "127.0.0.1:6379", "log_to_driver": True, "logging_level": "ERROR",
                              "runtime_env": {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}}, "coordinator",
                             "stats actor"]


def test_ray_data_config_file_quiets_its_console_only(monkeypatch):
    """Ray Data reloads the file in each process; its console handler drops INFO, its log file keeps it."""
    from ray.data._internal.logging import configure_logging

    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", str(ray_runtime.ray_data_logging_config("WARNING")))
    try:
        configure_logging()
        handlers = logging.getLogger("ray.data").handlers
        console = [h for h in handlers if type(h).__name__ == "PlainRayHandler"]
        assert console and all(h.level == logging.WARNING for h in console)
        assert any(h.level <= logging.INFO for h in handlers if h not in console)
    finally:
        monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG")
        configure_logging()  # Ray Data's defaults again for the rest of the session


def test_workers_quiet_ray_trains_report_lines():
    """Ray Train's per-report logger is named by its file path, outside the ``ray.train`` tree LoggingConfig sets."""
    from ray.train.v2._internal.execution import context

    before = context.logger.level
    try:
        ray_runtime.quiet_train_reports(RayConfig())
        assert not context.logger.name.startswith("ray.train")
        assert not context.logger.isEnabledFor(logging.INFO) and context.logger.isEnabledFor(logging.WARNING)
    finally:
        context.logger.setLevel(before)


def test_training_starts_ray_with_the_state_api(monkeypatch):
    from cadiff.train import launch

    class Started(Exception):
        pass

    seen = {}

    def record(ray_cfg, **kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(launch, "init_ray", record)
    with pytest.raises(Started):
        launch.run_training(compose("train_ae", ["strategy=ddp"]), "ae")
    assert seen == {"state_api": True}
    assert ray_runtime.train_logging_config(RayConfig(log_level="ERROR")).log_level == "ERROR"


def test_startup_heartbeat_until_the_first_metrics_line(tmp_path, caplog):
    """The driver fills the workers' silent start-up with a line every few seconds, and stops at rank 0's first
    metrics line (a resumed run's metrics.jsonl exists already: a change counts, not existence)."""
    from cadiff.train.launch import startup_heartbeat

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 5}\n')
    os.utime(metrics, (1, 1))
    caplog.set_level(logging.INFO, logger="cadiff.runtime.heartbeat")

    def beats() -> int:
        return sum("starting the training workers" in r.getMessage() for r in caplog.records)

    with startup_heartbeat(metrics, every_s=0.05):
        deadline = time.monotonic() + 20
        while beats() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert beats() >= 2
        metrics.write_text('{"step": 5}\n{"step": 10}\n')
        time.sleep(0.1)
        seen = beats()
        time.sleep(0.3)
        assert beats() == seen


def test_log_options_are_checked_at_compose():
    assert compose("encode_latents", ["ray.log_level=INFO"]).ray.log_level == "INFO"
    with pytest.raises(ConfigError, match="ray.log_level"):
        compose("train_ae", ["ray.log_level=LOUD"])
    with pytest.raises(ConfigError, match="status_every_s"):
        compose("sweep", ["status_every_s=0"])


# ---------------------------------------------------------------------------------------------------------
# the sweep's trial table


def _trial(trial_id, status, lr, result):
    return SimpleNamespace(trial_id=trial_id, status=status, config={"trainer.lr": lr}, last_result=result,
                           error_file=None)


TRIALS = [_trial("a1", "TERMINATED", 1e-3, {"step": 20, "val_loss": 0.5}),
          _trial("b2", "RUNNING", 3e-4, {"step": 10, "val_loss": 0.25}),
          _trial("c3", "PENDING", 1e-2, {}),
          _trial("d4", "ERROR", 1e-1, {"step": 2, "val_loss": float("nan")})]


def test_trial_table_rows_and_best_trial():
    lines = trial_table(TRIALS, ["trainer.lr"], "val_loss", "min", elapsed_s=95)
    assert lines[0] == ("sweep: 4 trials after 95s: 1 ERROR, 1 PENDING, 1 RUNNING, 1 TERMINATED; "
                        "best val_loss=0.25 (trial_b2)")
    assert lines[1].split() == ["trial", "status", "trainer.lr", "step", "val_loss"]
    assert lines[3].split() == ["trial_b2", "RUNNING", "0.0003", "10", "0.25"]
    assert lines[4].split() == ["trial_c3", "PENDING", "0.01", "-", "-"]
    assert lines[1].index("step") == lines[2].index("20") and lines[1].index("val_loss") == lines[2].index("0.5")
    assert best_trial(TRIALS, "val_loss", "max").trial_id == "a1"  # NaN never wins
    assert best_trial(TRIALS[2:3], "val_loss", "min") is None


def test_trial_table_is_logged_at_its_interval_and_at_the_end(monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr("cadiff.tune.status.time.monotonic", lambda: clock[0])
    table = TrialTable(["trainer.lr"], "val_loss", "min", every_s=60)
    table.setup()
    caplog.set_level(logging.INFO, logger="cadiff.tune.status")
    for t in (10, 59, 61, 100, 122):
        clock[0] = 1000.0 + t
        table.on_step_end(iteration=t, trials=TRIALS)
    assert [r.getMessage().splitlines()[0].split(":")[1] for r in caplog.records] == [" 4 trials after 61s", " 4 trials after 122s"]
    caplog.clear()
    table.on_trial_complete(iteration=1, trials=TRIALS, trial=TRIALS[0])
    table.on_experiment_end(trials=TRIALS)
    assert caplog.records[0].getMessage() == "sweep: trial_a1 finished at step 20, val_loss=0.5"
    assert len(caplog.records[1].getMessage().splitlines()) == 2 + len(TRIALS)
