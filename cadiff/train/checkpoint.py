"""Checkpoint folders and model exports, independent of the distribution strategy.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<n:08d>/`` holding whatever ``Strategy.save`` wrote
plus a ``COMPLETE`` marker: a JSON manifest of the step and every file with its size. It is written in a
hidden temp folder, fsynced, marked and only then renamed into place, so a crash mid-write leaves the
previous checkpoint as the latest loadable one; ``latest()`` ignores folders whose manifest is missing or
does not match the files. Retention (``num_to_keep``) never deletes the checkpoint just committed.

An export is ONE file for inference and stage 2: ``{"format": "cadiff-export", "version", "state_dict",
"model_config", "meta"}`` holding only tensors and plain Python types, loadable with
``torch.load(weights_only=True)`` and without DeepSpeed/FSDP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cadiff.errors import CheckpointError, ConfigError
from cadiff.io import atomic_path, fsync_path

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
EXPORT_FORMAT = "cadiff-export"
# 2: stage-1 DiffAE with a mean head and a per-pixel noise model (decoder_form=mean_flow); version-1 stage-1
# exports were decoders whose reconstructions ignored the latent, so they are refused rather than converted
EXPORT_VERSION = 2
_STEP_RE = re.compile(r"^(?:\.replaced_)?step_(\d+)$")


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing or unsafe/corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"'{path}' cannot be loaded with torch.load(weights_only=True): {detail}; expected a file of "
            "tensors and plain Python types written by cadiff"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# atomic checkpoint folders


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist_rank_world()[1] > 1:
        dist.barrier()


def _list_files(folder: Path) -> dict[str, int]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MARKER:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``COMPLETE`` manifest of a checkpoint folder, or None when it is missing, unreadable or stale."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MARKER).read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    match = _STEP_RE.match(folder.name)
    if match is None or int(match.group(1)) != step:
        return None
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
    return manifest


class CheckpointManager:
    """Atomic ``checkpoints/step_<n>`` folders under ``run_dir`` with ``num_to_keep`` retention.

    With a torch.distributed process group every rank calls ``tmp_dir`` and ``commit`` (they synchronize);
    rank 0 alone renames and deletes. Every rank must see ``run_dir``.
    """

    def __init__(self, run_dir: str | os.PathLike, num_to_keep: int = 2) -> None:
        if num_to_keep < 1:
            raise ConfigError(f"config key 'trainer.num_to_keep' = {num_to_keep!r}: expected >= 1")
        self.root = Path(run_dir) / "checkpoints"
        self.num_to_keep = int(num_to_keep)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{int(step):08d}"

    def tmp_dir(self, step: int) -> Path:
        """A fresh hidden folder to write the checkpoint of ``step`` into (collective)."""
        tmp = self.root / f".tmp_step_{int(step):08d}"
        if _dist_rank_world()[0] == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_leftovers()
            tmp.mkdir()
        _barrier()
        return tmp

    def commit(self, tmp: str | os.PathLike, step: int) -> Path:
        """Mark ``tmp`` COMPLETE, fsync it and rename it to ``step_<n>``, then apply retention (collective)."""
        tmp = Path(tmp)
        final = self.step_dir(step)
        _barrier()  # every rank has finished writing into tmp
        if _dist_rank_world()[0] == 0:
            if not tmp.is_dir():
                raise CheckpointError(f"checkpoint temp folder '{tmp}' does not exist; expected one from tmp_dir({step})")
            files = _list_files(tmp)
            for rel in files:
                fsync_path(tmp / rel)
            manifest = {"step": int(step), "files": files}
            with atomic_path(tmp / MARKER) as marker:
                marker.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            for sub in {(tmp / rel).parent for rel in files} | {tmp}:
                fsync_path(sub)
            if final.exists():
                # keep the old copy of this step recoverable until the new one is in place
                replaced = self.root / f".replaced_{final.name}"
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
                os.replace(tmp, final)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_path(self.root)
            self._prune(keep=final)
            log.info("checkpoint committed: %s", final)
        _barrier()
        return final

    def checkpoints(self) -> list[Path]:
        """Complete ``step_<n>`` folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and read_manifest(p) is not None]
        return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None (incomplete and half-deleted folders are ignored)."""
        if not self.root.is_dir():
            return None
        by_step = {int(_STEP_RE.match(p.name).group(1)): p for p in self.checkpoints()}
        # a crash between the two renames of a same-step replacement leaves only the old copy
        for p in self.root.glob(".replaced_step_*"):
            step = int(_STEP_RE.match(p.name).group(1))
            if step not in by_step and read_manifest(p) is not None:
                by_step[step] = p
        return by_step[max(by_step)] if by_step else None

    def export(self, path: str | os.PathLike, ema_state: Mapping[str, torch.Tensor], model_config: Mapping, meta: Mapping) -> Path:
        """Write the single-file export (see ``export_model``)."""
        return export_model(path, ema_state, model_config, meta)

    def load_export(self, path: str | os.PathLike, expected_config: Mapping | None = None) -> tuple[dict, dict, dict]:
        """Read an export (see ``load_export``)."""
        return load_export(path, expected_config)

    def _clean_leftovers(self) -> None:
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob(".deleting_*"):
            shutil.rmtree(stale, ignore_errors=True)
        for replaced in self.root.glob(".replaced_step_*"):
            final = self.root / replaced.name[len(".replaced_"):]
            if not final.exists() and read_manifest(replaced) is not None:
                os.replace(replaced, final)
            else:
                shutil.rmtree(replaced, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        complete = self.checkpoints()
        excess = len(complete) - self.num_to_keep
        for path in [p for p in complete if p != keep][: max(0, excess)]:
            # rename first: a crash mid-delete must not leave a half-deleted folder under a step_ name
            doomed = self.root / f".deleting_{path.name}"
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# exports


def _plain(obj: Any, where: str) -> Any:
    """A copy of ``obj`` built from dict/list/str/int/float/bool/None only (tuples become lists)."""
    with contextlib.suppress(ImportError):
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(list(obj))]
    raise CheckpointError(f"export field '{where}' has type {type(obj).__name__}: expected plain dict/list/str/number/bool/None")


def export_model(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], model_config: Mapping, meta: Mapping | None = None
) -> Path:
    """Atomically write EMA weights + model config + meta as one ``torch.load(weights_only=True)`` file."""
    path = Path(path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"export '{path}': state entries {bad[:3]} are not tensors; expected a state_dict")
    payload = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
        "model_config": _plain(dict(model_config), "model_config"),
        "meta": _plain(dict(meta or {}), "meta"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    log.info("exported %d tensors to %s", len(payload["state_dict"]), path)
    return path


def resolve_export(path: str | os.PathLike) -> Path:
    """The export file for ``path``: the file itself, or ``<run>/export/model.pt`` / ``<dir>/model.pt`` for a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "export" / "model.pt", path / "model.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"folder '{path}' holds no export: expected export/model.pt (a finished training run) or model.pt")
    raise CheckpointError(f"export '{path}' does not exist; expected a model.pt written by a training run (or its run folder)")


def _config_diff(stored: Mapping, expected: Mapping) -> list[str]:
    missing = object()
    diffs = []
    for key, want in expected.items():
        have = stored.get(key, missing)
        if have is missing:
            diffs.append(f"{key}: missing in export, expected {want!r}")
        elif have != want:
            diffs.append(f"{key}: export has {have!r}, expected {want!r}")
    return diffs


def load_export(path: str | os.PathLike, expected_config: Mapping | None = None) -> tuple[dict, dict, dict]:
    """Read an export -> ``(state_dict, model_config, meta)``; every key of ``expected_config`` must match."""
    file = resolve_export(path)
    obj = safe_load(file)
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"'{file}' is not a cadiff export (no format='{EXPORT_FORMAT}' record); expected a file written by export_model")
    if obj.get("version") != EXPORT_VERSION:
        hint = (" (written before the stage-1 decoder gained its mean head: retrain the train_ae run, then "
                "encode_latents and train_latent on top of it)" if obj.get("version") == 1 else "")
        raise CheckpointError(f"export '{file}' has version {obj.get('version')!r}; this cadiff reads version "
                              f"{EXPORT_VERSION}{hint}")
    model_config = obj["model_config"]
    if expected_config is not None:
        diffs = _config_diff(model_config, _plain(dict(expected_config), "expected_config"))
        if diffs:
            raise CheckpointError(f"export '{file}' is from another model config: {'; '.join(diffs[:5])}")
    return obj["state_dict"], model_config, obj["meta"]
