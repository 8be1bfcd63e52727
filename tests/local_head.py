"""A private `ray start --head --block` for tests that need their own cluster (job server, fake autoscaler).

The head runs in its own temp dir on 127.0.0.1 with every port picked free; stopping it signals that one process,
then kills what is left of that cluster only - processes whose command line names its temp dir (GCS, raylets,
agents, workers, and the nodes a fake autoscaler started) - never other Ray sessions (``ray stop`` would stop
every Ray on the host).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` ports free on every address: a port free on 127.0.0.1 alone can be held on the host's own address by
    a process of another test (a Ray worker of the shared cluster), and the dashboard test then sees two listeners."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pids_under(temp_dir: str) -> list[int]:
    """Processes whose command line names this head's temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def head_command(temp_dir: str, num_cpus: int, dashboard: bool, *extra: str) -> tuple[list[str], dict[str, int]]:
    """`ray start --head --block` on 127.0.0.1 with every port free; returns the command and the gcs/dashboard ports."""
    gcs, dash, agent_http, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr = free_ports(9)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
        f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        *extra,
    ]  # fmt: skip
    return cmd, {"gcs": gcs, "dashboard": dash}


@contextlib.contextmanager
def head_process(cmd: list[str], env: dict[str, str], log_path: Path, temp_dir: str) -> Iterator[subprocess.Popen]:
    """Run the head; on exit SIGTERM it (``--block`` tears down what it started), then kill its stragglers."""
    log = open(log_path, "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield head
    finally:
        # graceful teardown takes ~30 s on 2 busy cores, which no test need wait for
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        for pid in pids_under(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def short_temp_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
