"""Ray start-up shared by every job: join ``ray.address`` / ``$RAY_ADDRESS`` or start a private local cluster.

Ray's own console output is set here, at its sources, to ``ray.log_level`` (WARNING by default): the driver's
``ray`` logger (``ray.init(logging_level=)``), Ray Train's (``RunConfig.logging_config``, see
:func:`train_logging_config`) and Ray Data's console handler (its ``RAY_DATA_LOGGING_CONFIG`` file). A job whose
work *is* a Ray Data pipeline (``encode_latents``) asks for ``data_progress`` and keeps Ray Data's progress log;
training jobs print their own progress line instead.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from cadiff.errors import ConfigError
from cadiff.io import write_text_atomic
from cadiff.runtime.heartbeat import heartbeat

log = logging.getLogger(__name__)

# cadiff's training code is written against Ray Train V2 (default only in recent Ray; pyproject allows older)
TRAIN_V2_ENV = {"RAY_TRAIN_V2_ENABLED": "1"}


def require_train_v2() -> None:
    """Select Ray Train V2 in this driver (before ``ray.train`` is imported: it picks its API at import)."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1") != "1":
        log.warning("RAY_TRAIN_V2_ENABLED=%s overridden to 1: cadiff needs Ray Train V2",
                    os.environ["RAY_TRAIN_V2_ENABLED"])
    os.environ.update(TRAIN_V2_ENV)
    if "ray.train" in sys.modules and "ray.train.v2.api.config" not in sys.modules:
        raise ConfigError("ray.train was imported with Ray Train V1 before cadiff set RAY_TRAIN_V2_ENABLED=1; "
                          "set RAY_TRAIN_V2_ENABLED=1 in the environment of this process")


def init_ray(ray_cfg: Any, state_api: bool = False, log_to_driver: bool = True, data_progress: bool = False) -> None:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS``, else start a local Ray whose dashboard binds to 127.0.0.1.

    ``state_api=True`` (every Ray Train job: training, sweeps) starts the local dashboard and names it in
    ``RAY_API_SERVER_ADDRESS`` for every process. Ray Train's placement-group cleaner asks the State API once a
    second whether the Train controller is alive (and Tune kills the controller of a stopped trial): without a
    dashboard, or with several local Ray instances on one host (it would pick the latest one), every query fails
    with a warning, the trial's worker CPUs leak and later trials wait forever.
    ``data_progress=True`` keeps Ray Data's progress log (every 10 s when stdout is not a terminal).
    """
    import ray

    require_train_v2()
    if ray.is_initialized():
        return
    _configure_ray_data(data_progress)
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # the workers of an existing cluster read the flag too (Ray merges this with a submitted job's env)
        ray.init(address=address, log_to_driver=True, logging_level=ray_cfg.log_level,
                 runtime_env={"env_vars": dict(TRAIN_V2_ENV)})
        if state_api:
            _start_autoscaling_coordinator()
            _start_data_stats_actor()
        _sigterm_as_sigint()
        return
    # address="local": always a fresh local cluster, never a stale one recorded in /tmp/ray/ray_current_cluster
    env_vars = local_env_vars(ray_cfg.log_level, data_progress)
    dashboard_port = None
    if state_api:
        dashboard_port = _free_port(ray_cfg.dashboard_host)
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://{ray_cfg.dashboard_host}:{dashboard_port}"
    with heartbeat(lambda s: f"starting a local Ray cluster ({s:.0f}s)"):
        ray.init(
            address="local",
            num_cpus=ray_cfg.num_cpus,
            include_dashboard=ray_cfg.include_dashboard or state_api,
            dashboard_host=ray_cfg.dashboard_host,
            dashboard_port=dashboard_port,
            log_to_driver=log_to_driver,
            logging_level=ray_cfg.log_level,
            runtime_env={"env_vars": env_vars},
        )
        if state_api:
            _start_autoscaling_coordinator()
    if dashboard_port is not None:
        log.info("Ray dashboard: http://%s:%d", ray_cfg.dashboard_host, dashboard_port)
    _sigterm_as_sigint()


def _start_autoscaling_coordinator() -> None:
    """Start Ray's autoscaling-coordinator actor and wait until it runs.

    Ray Train's controller sends it the workers' resource request first thing and waits 5 s - less than starting
    an actor process takes on a busy 2-core host, where every run then logged a 20-line traceback.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray layout: the controller starts it itself
        return
    import ray

    ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote())


def _start_data_stats_actor() -> None:
    """Start Ray Data's stats actor on this driver's node and wait until it runs.

    It is a detached actor created on the node of the first process that runs a dataset: from a Tune trial or
    a Train data coordinator on an autoscaled worker, it would keep that node busy, never released by the
    autoscaler. A driver's node (the head, for a submitted job) is not scaled down.
    """
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # another Ray layout: Ray Data places it itself
        return
    import ray

    ray.get(get_or_create_stats_actor().__ray_ready__.remote())


def local_env_vars(log_level: str, data_progress: bool) -> dict[str, str]:
    """Environment of every process of a local cluster cadiff starts."""
    env = {
        **TRAIN_V2_ENV,
        # the watcher polls for node preemption notices, which a one-machine cluster never gets
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    if not data_progress:
        env["RAY_DATA_LOGGING_CONFIG"] = str(ray_data_logging_config(log_level))
    return env


def ray_data_logging_config(level: str) -> Path:
    """A copy of Ray Data's default logging config whose console handler logs at ``level`` (its log file keeps
    everything), written once per level under the temp folder; Ray Data reloads it in every process for every
    dataset execution, so a level set on a logger would not last."""
    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = level
    text = yaml.safe_dump(config, sort_keys=True)
    path = Path(tempfile.gettempdir()) / f"cadiff-ray-data-logging-{level.lower()}.yaml"
    if not path.is_file() or path.read_text() != text:
        write_text_atomic(path, text)
    return path


def _configure_ray_data(progress: bool) -> None:
    """Driver-side Ray Data context, inherited by the datasets this process builds."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    # "Starting execution of Dataset ..." and its plan, once per training epoch; the log file keeps them
    context.print_on_execution_start = progress


def train_logging_config(ray_cfg: Any) -> Any:
    """Ray Train's console level (``ray.train`` loggers of the controller and workers) for a RunConfig."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=ray_cfg.log_level)


def quiet_train_reports(ray_cfg: Any) -> None:
    """In a Ray Train worker: log Ray Train's line per ``ray.train.report`` only at ``ray.log_level``.

    Ray Train 2.60 names that logger by its file path, outside ``ray.train``, so ``RunConfig.logging_config``
    does not reach it: every report (each progress line's metrics, each checkpoint) printed a line per rank.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its report lines, if any, stay as they are
        return
    report_log = getattr(context, "logger", None)
    if isinstance(report_log, logging.Logger) and not report_log.name.startswith("ray.train"):
        report_log.setLevel(ray_cfg.log_level)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _sigterm_as_sigint() -> None:
    """Handle SIGTERM like Ctrl-C: Ray's core worker would otherwise abort the driver (SIGABRT, no cleanup).

    Whatever SIGINT handler is current when the signal arrives runs: Ray Train's graceful abort inside
    ``fit()``, else Python's KeyboardInterrupt; the job CLI then prints one line and exits non-zero.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def forward(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, forward)
