"""Reproducibility record of a job: resolved config, seed, package versions and git revision."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cadiff.io import write_json_atomic, write_text_atomic

PACKAGES = ("torch", "ray", "deepspeed", "numpy", "webdataset", "hydra-core", "omegaconf", "tifffile", "h5py", "pynwb")
SECRET_MARKERS = ("api_key", "apikey", "token", "password", "secret")


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
