"""Session fixture: a real S3-compatible server (moto_server) on 127.0.0.1 with one bucket, for storage tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BUCKET = "cadiff-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_server() -> str | None:
    beside = Path(sys.executable).with_name("moto_server")
    return str(beside) if beside.is_file() else shutil.which("moto_server")


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_bucket():
    """``s3://cadiff-test`` on a moto_server started for this session; the env points pyarrow (and Ray workers
    started after it) at it. Skipped when moto[server] is not installed."""
    pytest.importorskip("moto")
    exe = _moto_server()
    if exe is None:
        pytest.skip("moto_server not found (pip install 'moto[server]')")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        _wait_ready(url, proc)
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=url)
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=url, access_key="testing", secret_key="testing", region="us-east-1",
                                allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
