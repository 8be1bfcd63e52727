"""Ray start-up shared by every job: join ``ray.address`` / ``$RAY_ADDRESS`` or start a private local cluster."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


def init_ray(ray_cfg: Any, state_api: bool = False, log_to_driver: bool = True) -> None:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS``, else start a local Ray whose dashboard binds to 127.0.0.1.

    ``state_api=True`` (sweeps) starts the local dashboard and names it in ``RAY_API_SERVER_ADDRESS`` for every
    process: Tune kills the Train controller of a stopped trial, and Ray Train's placement-group cleaner asks the
    State API whether the controller is alive. Without a dashboard, or with several local Ray instances on one
    host (it picks the latest one), the cleaner fails, the trial's worker CPUs leak and later trials wait forever.
    """
    import ray

    if ray.is_initialized():
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver logs its own progress line
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        _sigterm_as_sigint()
        return
    # address="local": always a fresh local cluster, never a stale one recorded in /tmp/ray/ray_current_cluster
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1"}
    dashboard_port = None
    if state_api:
        dashboard_port = _free_port(ray_cfg.dashboard_host)
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://{ray_cfg.dashboard_host}:{dashboard_port}"
    ray.init(
        address="local",
        num_cpus=ray_cfg.num_cpus,
        include_dashboard=ray_cfg.include_dashboard or state_api,
        dashboard_host=ray_cfg.dashboard_host,
        dashboard_port=dashboard_port,
        log_to_driver=log_to_driver,
        runtime_env={"env_vars": env_vars},
    )
    _sigterm_as_sigint()


def _free_port(host: str) -> int:
    import socket

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
