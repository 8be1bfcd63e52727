"""`ray start --head` + `ray job submit --working-dir . -- python jobs/train_ae.py ...` against a local head.

The head runs in its own temp dir on 127.0.0.1 with every port picked free, started with ``--block`` so that
SIGTERM to that one process stops exactly this cluster (``ray stop`` would stop every Ray on the host).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from cadiff.runtime.exports import load_export
from cadiff.train.launch import RUNTIME_ENV_EXCLUDES

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HEAD_START_S = 180  # the head and its dashboard come up in ~10 s idle, minutes on a loaded 2-core box
JOB_S = 420


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_under(temp_dir: str) -> list[int]:
    """Processes whose command line names this head's temp dir (its GCS, raylet, agents, workers)."""
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


def _wait_http(url: str, timeout_s: float, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up (401: Ray token auth, which `ray job` handles)
        except OSError:
            time.sleep(2)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head --block` on 127.0.0.1 with 4 CPUs: yields (dashboard_url, dashboard_port)."""
    temp_dir = tempfile.mkdtemp(prefix="cadiff-rj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, agent_http, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr = _free_ports(9)
    # Ray token auth, explicit and private to this head: the head, `ray job` and the job driver share the token
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_TRAIN_V2_ENABLED="1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    log = open(tmp_path / "ray_head.log", "w")
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
    ]  # fmt: skip
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{url}/api/version", HEAD_START_S, head)
        yield url, dash, env
    finally:
        # SIGTERM makes `ray start --block` tear down the processes it started (gracefully: ~30 s on 2 busy
        # cores, which this test need not wait for); then kill its process group and the stragglers of this
        # head only (matched by its temp dir), never other Ray sessions on the machine.
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)
        for pid in _pids_under(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening_hosts(port: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.laddr.port == port}


def test_ray_job_submit_trains_on_local_head(ray_head, sim_data_root, tmp_path):
    url, dash_port, env = ray_head
    hosts = _listening_hosts(dash_port)
    assert hosts == {"127.0.0.1"}, f"dashboard must listen on 127.0.0.1 only, listens on {hosts}"

    out_root = tmp_path / "out"
    submission = f"cadiff-j1-{uuid.uuid4().hex[:8]}"
    submit = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--submission-id", submission,
        "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": RUNTIME_ENV_EXCLUDES}),
        "--", "python", "jobs/train_ae.py", "experiment=ae_tiny", f"data.root={sim_data_root}",
        f"out_root={out_root}", "run_name=j1", "trainer.max_steps=2", "trainer.num_workers=2",
        "trainer.cpus_per_worker=0.5",
    ]  # fmt: skip
    # without --no-wait `ray job submit` follows the job's logs and exits 1 when the job fails
    try:
        proc = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_S)
    except subprocess.TimeoutExpired:
        subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", url, submission], env=env, timeout=120)
        raise
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"Job '{submission}' succeeded" in logs, logs[-4000:]

    # the job ran the uploaded copy of the repository with the venv's interpreter (torch, ray importable)
    assert "Uploading package" in logs or "Creating a file package" in logs, logs[:2000]
    final = [line for line in logs.splitlines() if line.startswith("cadiff train_ae:")]
    assert final and final[-1].startswith("cadiff train_ae: ok step=2"), logs[-2000:]
    run_dir = out_root / "train_ae" / "j1"
    assert final[-1].endswith(f"-> {run_dir}")
    assert list((run_dir / "checkpoints").glob("step_*")), "the job wrote no Ray Train checkpoint"
    _state, model_cfg, meta = load_export(run_dir / "export" / "model.pt")
    assert meta["step"] == 2 and model_cfg["kind"] == "diffae"
