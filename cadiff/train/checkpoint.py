"""Checkpoint folders and model exports, independent of the distribution strategy.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<n:08d>/`` holding whatever ``Strategy.save`` wrote
plus a ``COMPLETE`` marker: a JSON manifest of the step and every file with its size. It is written in a
hidden temp folder, fsynced, marked and only then renamed into place, so a crash mid-write leaves the
previous checkpoint as the latest loadable one; ``latest()`` ignores folders whose manifest is missing or
does not match the files. Retention (``num_to_keep``) never deletes the checkpoint just committed.

Model exports (one file for inference and stage 2) live in :mod:`cadiff.runtime.exports`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cadiff.errors import CheckpointError, ConfigError
from cadiff.io import atomic_path, fsync_path
from cadiff.runtime.exports import export_model, load_export

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^(?:\.replaced_)?step_(\d+)$")


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
