"""Reproducibility record of a job: resolved config, seed, package versions and git revision; for a training
run, also where each of its ranks ran (:func:`record_workers`)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cadiff.errors import CadiffError
from cadiff.io import write_json_atomic, write_text_atomic

PACKAGES = ("torch", "ray", "deepspeed", "numpy", "webdataset", "hydra-core", "omegaconf", "tifffile", "h5py", "pynwb")
SECRET_MARKERS = ("api_key", "apikey", "token", "password", "secret")
_SESSION_RECORD = re.compile(r"run(?:\.(\d+))?\.json")  # run.json (session 0), run.<n>.json (resumed session n)


def git_revision(cwd: str | Path | None = None) -> str:
    """`git describe` of the code (with -dirty), or 'unknown' outside a checkout."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def scrub_secrets(obj: Any) -> Any:
    """Drop values whose key looks like a credential, so run records never hold a wandb key."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if any(m in str(k).lower() for m in SECRET_MARKERS) else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    return obj


def record_run(out_dir: str | Path, cfg: Any, job: str, seed: int | None = None, suffix: str = "") -> dict[str, Any]:
    """Write ``config<suffix>.yaml`` and ``run<suffix>.json`` (seed, versions, git revision, host, time) into
    ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = scrub_secrets(OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg)
    write_text_atomic(out_dir / f"config{suffix}.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))
    info = {
        "job": job,
        "seed": seed if seed is not None else plain.get("seed"),
        "git_revision": git_revision(),
        "packages": package_versions(),
        "host": platform.node(),
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out_dir / f"run{suffix}.json", info)
    return info


def worker_location(rank: int, device: str) -> dict[str, Any]:
    """Where this process trains: its rank, Ray node id (None outside Ray), host, pid and torch device."""
    import ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"rank": rank, "node_id": node_id, "host": platform.node(), "pid": os.getpid(), "device": device}


def latest_run_record(run_dir: str | Path) -> Path:
    """The newest session's ``run.json`` / ``run.<n>.json`` in ``run_dir`` (see ``launch.record_plan``)."""
    sessions = {}
    for path in Path(run_dir).glob("run*.json"):
        match = _SESSION_RECORD.fullmatch(path.name)
        if match:
            sessions[int(match.group(1) or 0)] = path
    if not sessions:
        raise CadiffError(f"{run_dir}: no run.json (the driver records the run before any worker starts)")
    return sessions[max(sessions)]


def record_workers(run_dir: str | Path, workers: list[dict[str, Any]]) -> Path:
    """Add ``workers`` (one :func:`worker_location` per rank) to the newest session's run record; a restarted
    worker group (Ray Train ``max_failures``) replaces the earlier placement."""
    path = latest_run_record(run_dir)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        info = exc
    if not isinstance(info, dict):
        raise CadiffError(f"{path}: unreadable run record ({info!r}); expected the JSON object record_run wrote")
    write_json_atomic(path, {**info, "workers": sorted(workers, key=lambda w: w["rank"])})
    return path
