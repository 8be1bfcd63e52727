"""`ray start --head` + `ray job submit --working-dir . -- python jobs/train_ae.py ...` against a local head
(tests/local_head.py: its own temp dir and free ports, stopped without touching other Ray sessions)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from cadiff.runtime.exports import load_export
from cadiff.train.launch import RUNTIME_ENV_EXCLUDES
from tests.local_head import VENV_BIN, head_command, head_process, short_temp_dir

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
HEAD_START_S = 180  # the head and its dashboard come up in ~10 s idle, minutes on a loaded 2-core box
JOB_S = 420


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


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head --block` on 127.0.0.1 with 4 CPUs, shared by this module's tests: yields
    (dashboard_url, dashboard_port, env)."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    temp_dir = short_temp_dir("cadiff-rj-")
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
    cmd, ports = head_command(temp_dir, 4, dashboard=True)
    with head_process(cmd, env, tmp_path / "ray_head.log", temp_dir) as head:
        url = f"http://127.0.0.1:{ports['dashboard']}"
        _wait_http(f"{url}/api/version", HEAD_START_S, head)
        yield url, ports["dashboard"], env


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


def test_ray_job_submit_needs_the_token(ray_head, tmp_path):
    """The head runs as the cluster configs start theirs (RAY_AUTH_MODE=token): a client without the token, or with
    another one, is refused with Ray's one-line reason before anything runs; with it, the job server answers."""
    url, _, env = ray_head
    home = tmp_path / "home"  # no ~/.ray/auth_token left there by other Ray sessions
    home.mkdir()
    client = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    client["HOME"] = str(home)
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--", "python", "-c", "print('ran')"]
    for extra, refusal in (
        ({}, "Authentication required: Unauthorized: Missing authentication token"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
         "Authentication failed: Forbidden: Invalid authentication token"),
    ):
        proc = subprocess.run(submit, env={**client, **extra}, capture_output=True, text=True, timeout=120)
        logs = proc.stdout + proc.stderr
        assert proc.returncode != 0 and refusal in logs and "ran" not in proc.stdout, logs[-3000:]
    listed = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", url], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
