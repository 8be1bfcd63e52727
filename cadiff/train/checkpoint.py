"""Checkpoint folders and model exports, independent of the distribution strategy.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<n:08d>/`` holding whatever ``Strategy.save`` wrote
plus a manifest of the step and every file with its size and sha256 (streamed while committing): ``COMPLETE``
when cadiff commits the folder (strategy=single, :class:`CheckpointManager`), or one ``COMPLETE_rank<r>`` per
rank when Ray Train merges the ranks' parts into one folder. cadiff's folders are written in a hidden temp
folder, fsynced, marked and only then renamed into place, so a crash mid-write leaves the previous checkpoint as
the latest loadable one. Listing checks sizes only (cheap); the digests are checked when a checkpoint is about
to be loaded (:func:`resume`), where a damaged or unloadable one makes the run fall back to the previous one and
is renamed aside (``.corrupt_step_<n>``), never deleted. Manifests of earlier versions have no sha256: they are
checked by size. Retention (``num_to_keep``) never deletes the checkpoint just committed.

Model exports (one file for inference and stage 2) live in :mod:`cadiff.runtime.exports`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cadiff.errors import CadiffError, CheckpointError, ConfigError
from cadiff.io import atomic_path, fsync_path, write_text_atomic
from cadiff.runtime.exports import export_model, load_export

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
RANK_MARKER = "COMPLETE_rank"  # + f"{rank:05d}": the manifest of one rank's part of a Ray Train checkpoint
CORRUPT = ".corrupt_"  # prefix of a checkpoint set aside because it failed its check or its load
SUPERSEDED = ".superseded_"  # prefix of a checkpoint newer than the one trainer.resume_from chose
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of its registered checkpoints
_CHUNK_BYTES = 1 << 20
_STEP_RE = re.compile(r"^(?:\.replaced_)?step_(\d+)$")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# manifests


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist_rank_world()[1] > 1:
        dist.barrier()


def step_of(folder: str | os.PathLike) -> int | None:
    """The step in a ``step_<n>`` (or ``.replaced_step_<n>``) folder name, else None."""
    match = _STEP_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def _is_marker(name: str) -> bool:
    return name == MARKER or name.startswith(RANK_MARKER)


def _list_files(folder: Path) -> dict[str, int]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not _is_marker(path.name):
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def _sha256(path: Path, fsync: bool = False) -> str:
    """Hex sha256 of a file, read in chunks; with ``fsync`` the file is also flushed to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, step: int, rank: int | None = None) -> Path:
    """Fsync every file of ``folder`` and write its manifest (sizes and sha256): ``COMPLETE``, or with ``rank``
    this rank's ``COMPLETE_rank<r>`` (a Ray Train worker's part, merged with the other ranks' parts)."""
    folder = Path(folder)
    files = _list_files(folder)
    manifest: dict[str, Any] = {"step": int(step), "files": files,
                                "sha256": {rel: _sha256(folder / rel, fsync=True) for rel in files}}
    name = MARKER
    if rank is not None:
        manifest.update(rank=int(rank), world_size=_dist_rank_world()[1])
        name = f"{RANK_MARKER}{int(rank):05d}"
    with atomic_path(folder / name) as marker:
        marker.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for sub in {(folder / rel).parent for rel in files} | {folder}:
        fsync_path(sub)
    return folder / name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"manifest {path.name} is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"manifest {path.name} is not a JSON object")
    return data


def _manifest_parts(folder: Path) -> list[dict[str, Any]]:
    if (folder / MARKER).is_file():
        return [_read_json(folder / MARKER)]
    parts = [_read_json(p) for p in sorted(folder.glob(f"{RANK_MARKER}*"))]
    if not parts:
        raise CheckpointError(f"no {MARKER} manifest")
    world = parts[0].get("world_size")
    ranks = sorted(p.get("rank", -1) for p in parts)
    if not isinstance(world, int) or any(p.get("world_size") != world for p in parts) or ranks != list(range(world)):
        raise CheckpointError(f"manifests of ranks {ranks} for world size {world}: a rank's part is missing")
    return parts


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's manifest, its ranks' parts merged: ``step``, ``files`` (sizes) and ``sha256`` (None in
    manifests of earlier versions). Raises CheckpointError saying what is missing or malformed."""
    parts = _manifest_parts(Path(folder))
    try:
        steps = {int(p["step"]) for p in parts}
        files = {str(rel): int(size) for p in parts for rel, size in p["files"].items()}
        digests = None
        if all("sha256" in p for p in parts):
            digests = {str(rel): str(h) for p in parts for rel, h in p["sha256"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError("malformed manifest (expected step, files and sha256)") from None
    if len(steps) != 1:
        raise CheckpointError(f"manifests of steps {sorted(steps)}")
    if digests is not None and digests.keys() != files.keys():
        raise CheckpointError("malformed manifest (sha256 and files list different files)")
    return {"step": steps.pop(), "files": files, "sha256": digests}


def _check_sizes(folder: Path, files: Mapping[str, int]) -> None:
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{rel} has {path.stat().st_size} bytes, the manifest {size}")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder whose name and file sizes match it, else None (a cheap listing check:
    no digests are computed)."""
    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
        if step_of(folder) != manifest["step"]:
            return None
        _check_sizes(folder, manifest["files"])
    except (CheckpointError, OSError):
        return None
    return manifest


def verify_checkpoint(folder: str | os.PathLike, unlisted_ok: bool = False) -> None:
    """Check a checkpoint before loading it: its manifest, every file's size and sha256 (size only for manifests
    of earlier versions, logged). ``unlisted_ok``: a folder without any manifest passes (a checkpoint Ray Train
    registered before cadiff wrote manifests). Raises CheckpointError with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError("no such folder")
    if unlisted_ok and not (folder / MARKER).exists() and not any(folder.glob(f"{RANK_MARKER}*")):
        log.info("checkpoint '%s' has no manifest (registered by Ray Train before cadiff wrote manifests): "
                 "loaded unchecked", folder)
        return
    manifest = load_manifest(folder)
    try:
        _check_sizes(folder, manifest["files"])
        if manifest["sha256"] is None:
            log.info("checkpoint '%s' has a manifest without sha256 (an earlier cadiff version): checked by size "
                     "only", folder)
            return
        for rel, expected in manifest["sha256"].items():
            actual = _sha256(folder / rel)
            if actual != expected:
                raise CheckpointError(f"{rel} fails its sha256 check (content changed at the same size: "
                                      f"{actual[:12]}..., manifest {expected[:12]}...)")
    except OSError as exc:
        raise CheckpointError(f"unreadable ({exc})") from None


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The step of a checkpoint folder: its name (``step_<n>``), else its manifest's step."""
    step = step_of(folder)
    return step if step is not None else int(load_manifest(folder)["step"])


def set_aside(folder: Path, prefix: str) -> Path:
    """Rename ``folder`` to ``<prefix><name>`` beside it (a free name; nothing is deleted); returns the new path."""
    base = folder.parent / f"{prefix}{folder.name.lstrip('.')}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}.{n}")
    try:
        os.replace(folder, target)
    except OSError as exc:
        raise CheckpointError(f"checkpoint '{folder}' could not be renamed aside to '{target.name}': {exc}") from None
    fsync_path(folder.parent)
    return target


# ---------------------------------------------------------------------------------------------------------
# atomic checkpoint folders


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
            write_manifest(tmp, step)
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
        """Complete ``step_<n>`` folders (by manifest and sizes), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and read_manifest(p) is not None]
        return sorted(found, key=step_of)

    def candidates(self) -> list[Path]:
        """Complete checkpoint folders, newest first: what a resume tries in turn."""
        if not self.root.is_dir():
            return []
        by_step = {step_of(p): p for p in self.checkpoints()}
        # a crash between the two renames of a same-step replacement leaves only the old copy
        for p in self.root.glob(".replaced_step_*"):
            if step_of(p) not in by_step and read_manifest(p) is not None:
                by_step[step_of(p)] = p
        return [by_step[step] for step in sorted(by_step, reverse=True)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None (incomplete and half-deleted folders are ignored)."""
        found = self.candidates()
        return found[0] if found else None

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
# resuming: every rank loads the newest checkpoint that passes its check and loads


def _from_rank0(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, broadcast to every rank (identity without a process group)."""
    rank, world = _dist_rank_world()
    value = compute() if rank == 0 else None
    if world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _first_failure(mine: str | None) -> str | None:
    """The first rank's failure (``"rank r: ..."`` when distributed), the same answer on every rank."""
    world = _dist_rank_world()[1]
    if world == 1:
        return mine
    every: list[str | None] = [None] * world
    dist.all_gather_object(every, mine)
    return next((f"rank {r}: {failure}" for r, failure in enumerate(every) if failure), None)


def _check_reason(folder: Path, unlisted_ok: bool) -> str | None:
    try:
        verify_checkpoint(folder, unlisted_ok)
    except CheckpointError as exc:
        return str(exc)
    return None


def _load_everywhere(folder: Path, load: Callable[[Path], T]) -> tuple[str | None, T | None]:
    """``load(folder)`` on every rank; the first rank's failure, if any, is every rank's answer."""
    loaded, failure = None, None
    try:
        loaded = load(folder)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever one rank cannot load, every rank must move past together
        detail = (str(exc).strip().splitlines() or [""])[0]
        failure = f"does not load: {detail if isinstance(exc, CadiffError) else f'{type(exc).__name__}: {detail}'}"
    return _first_failure(failure), loaded


def _set_aside_rejected(rejected: Sequence[tuple[Path, str]], resumed: str = "") -> None:
    """Rename each rejected checkpoint aside (``.corrupt_step_<n>``), logging why; a failed rename is logged too
    (the run goes on from the checkpoint that loaded)."""
    for bad, why in rejected:
        try:
            moved = set_aside(bad, CORRUPT)
        except CheckpointError as exc:
            log.warning("%s (it failed: %s)", exc, why)
            continue
        log.warning("checkpoint '%s' set aside as '%s' (kept, not deleted): %s%s", bad, moved.name, why, resumed)


def _tried(rejected: Sequence[tuple[Path, str]]) -> str:
    return "; ".join(f"'{folder}' ({reason})" for folder, reason in rejected)


def resume(candidates: Sequence[Path], load: Callable[[Path], T], registered_by_ray: bool = False) -> tuple[Path, T] | None:
    """Load the newest usable checkpoint of ``candidates`` (newest first) on every rank (collective).

    Rank 0 verifies each folder (:func:`verify_checkpoint`) and broadcasts the verdict; every rank then calls
    ``load(folder)`` and the ranks agree on its outcome, so all of them resume the same step. A folder that fails
    either is logged (WARNING, with the reason) and the previous one is tried; once one loads, rank 0 renames
    the failed ones aside (``.corrupt_step_<n>``). Returns ``(folder, load's result)``, or None without
    candidates; raises CheckpointError listing what was tried when none loads (nothing is moved then).

    ``registered_by_ray``: the candidate is the checkpoint Ray Train hands the workers. Nothing is set aside
    then (Ray Train keeps its own record of that folder and deletes it by name): a failure is an error, and the
    driver's :func:`prepare_resume` of the next session falls back past it. A folder without any manifest passes
    (registered by an earlier cadiff, which wrote none in Ray runs).
    """
    rejected: list[tuple[Path, str]] = []
    rank = _dist_rank_world()[0]
    for i, folder in enumerate(candidates):
        reason = _from_rank0(lambda folder=folder: _check_reason(folder, registered_by_ray))
        loaded = None
        if reason is None:
            reason, loaded = _load_everywhere(folder, load)
        if reason is None:
            if rank == 0:
                _set_aside_rejected(rejected)
            _barrier()
            return folder, loaded
        rejected.append((folder, reason))
        fall_back = not registered_by_ray and i + 1 < len(candidates)
        if rank == 0:
            log.warning("checkpoint '%s' cannot be resumed: %s%s", folder, reason,
                        f"; trying the previous one, '{candidates[i + 1].name}'" if fall_back else "")
        if not fall_back:
            break
    if not rejected:
        return None
    raise CheckpointError(f"no checkpoint could be resumed; tried newest first: {_tried(rejected)}. Nothing was moved: "
                          "pass trainer.resume_from=<step or checkpoint folder> to choose another one, or start a "
                          "new run_name")


def resume_candidates(found: Sequence[Path], target: Path | None) -> list[Path]:
    """What :func:`resume` tries, newest first: ``found`` (newest first), or with a ``trainer.resume_from``
    ``target`` the found checkpoints newer than it (written since that session started) and then the target."""
    if target is None:
        return list(found)
    step = checkpoint_step(target)
    return [p for p in found if p != target and checkpoint_step(p) > step] + [target]


# ---------------------------------------------------------------------------------------------------------
# driver side: trainer.resume_from, and Ray Train's record of registered checkpoints


def prepare_resume(run_dir: str | os.PathLike, resume_from: int | str | None, use_ray: bool) -> Path | None:
    """Settle which checkpoint a session starts from, on the driver before any worker starts (run lock held).

    ``resume_from`` (``trainer.resume_from``): an int picks ``checkpoints/step_<n>``, a string that checkpoint
    folder; it must exist and pass :func:`verify_checkpoint` (CheckpointError otherwise, nothing moved). The
    run's checkpoints newer than it are renamed aside (``.superseded_step_<n>``) so that it is the latest and
    training continues from it; it is returned for the workers. None: the latest, as Ray Train or
    :class:`CheckpointManager` finds it. With Ray Train, registered checkpoints are verified newest first and
    those failing are set aside (``.corrupt_step_<n>``) before its controller reads its record of them, which
    is rewritten without any folder that is gone (see :func:`repair_ray_record`).
    """
    root = Path(run_dir) / "checkpoints"
    target = None
    if resume_from is not None:
        target = _resume_target(root, resume_from)
        _supersede_after(root, target, resume_from)
    elif use_ray:
        _set_aside_failed_registered(root)
    if use_ray:
        repair_ray_record(root)
    return target


def _resume_target(root: Path, resume_from: int | str) -> Path:
    if isinstance(resume_from, int):
        folder = root / f"step_{resume_from:08d}"
    else:
        folder = Path(resume_from).expanduser().resolve()
    what = f"trainer.resume_from={resume_from!r}"
    if not folder.is_dir():
        have = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        raise CheckpointError(f"{what}: no checkpoint folder '{folder}'; this run has {', '.join(have) or 'none'}")
    reason = _check_reason(folder, unlisted_ok=folder.resolve() in {p.resolve() for p in ray_registered(root)})
    if reason is not None:
        raise CheckpointError(f"{what}: checkpoint '{folder}' cannot be resumed: {reason}; expected a complete, "
                              "intact checkpoint folder (nothing was moved)")
    return folder


def _supersede_after(root: Path, target: Path, resume_from: int | str) -> None:
    """Rename aside this run's checkpoint folders past ``target`` (from its step on when it is another run's)."""
    if not root.is_dir():
        return
    step = checkpoint_step(target)
    inside = target.resolve().parent == root.resolve()
    for folder in sorted(root.iterdir()):
        n = step_of(folder)
        if n is None or folder.resolve() == target.resolve() or n < step or (n == step and inside):
            continue
        log.warning("trainer.resume_from=%r: '%s' set aside as '%s' (kept, not deleted)", resume_from, folder,
                    set_aside(folder, SUPERSEDED).name)


def _set_aside_failed_registered(root: Path) -> None:
    """Verify Ray Train's registered checkpoints newest first; when an older one passes, set the newer failed
    ones aside. When none passes, raise (nothing moved)."""
    rejected = []
    for folder in ray_registered(root):
        reason = _check_reason(folder, unlisted_ok=True)
        if reason is None:
            _set_aside_rejected(rejected, f"; resuming from '{folder.name}'")
            return
        rejected.append((folder, reason))
    if rejected:
        raise CheckpointError(f"no checkpoint Ray Train registered could be resumed; tried newest first: "
                              f"{_tried(rejected)}. Nothing was moved: pass trainer.resume_from=<step or checkpoint "
                              "folder> to choose another one, or start a new run_name")


def _read_ray_record(root: Path) -> dict[str, Any] | None:
    path = root / RAY_SNAPSHOT
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if len(record["checkpoint_results"]) != len(record["checkpoint_report_indices"]):
            raise ValueError("one report index per checkpoint expected")
        if not all(isinstance(entry["checkpoint_dir_name"], str) for entry in record["checkpoint_results"]):
            raise ValueError("checkpoint_dir_name: expected a folder name")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"Ray Train's checkpoint record '{path}' is unreadable ({exc}); expected the JSON Ray "
                              "Train V2 writes") from None
    return record


def ray_registered(root: str | os.PathLike) -> list[Path]:
    """Folders of the checkpoints Ray Train V2 registered under ``root`` (its snapshot), newest report first."""
    root = Path(root)
    record = _read_ray_record(root)
    if record is None:
        return []
    order = sorted(zip(record["checkpoint_report_indices"], record["checkpoint_results"]), key=lambda x: -x[0])
    return [root / entry["checkpoint_dir_name"] for _, entry in order]


def repair_ray_record(root: str | os.PathLike) -> list[str]:
    """Drop from Ray Train V2's snapshot every checkpoint whose folder is gone (set aside, or removed by hand);
    its latest becomes the newest remaining one. Ray Train refuses to start on a record naming a missing folder
    and deletes old checkpoints by folder name, so it must never name a folder cadiff has moved. Returns the
    dropped folder names. The driver calls this before ``fit()``, while no controller holds the record."""
    root = Path(root)
    record = _read_ray_record(root)
    if record is None:
        return []
    gone = {e["checkpoint_dir_name"] for e in record["checkpoint_results"] if not (root / e["checkpoint_dir_name"]).is_dir()}
    if not gone:
        return []
    kept = [(i, e) for i, e in zip(record["checkpoint_report_indices"], record["checkpoint_results"])
            if e["checkpoint_dir_name"] not in gone]
    record["checkpoint_results"] = [e for _, e in kept]
    record["checkpoint_report_indices"] = [i for i, _ in kept]
    record["latest_checkpoint_result"] = max(kept, key=lambda x: x[0])[1] if kept else None
    pending = list(zip(record.get("pending_training_results", []), record.get("pending_validation_specs", [])))
    pending = [(r, v) for r, v in pending if r.get("checkpoint_dir_name") not in gone]
    record["pending_training_results"] = [r for r, _ in pending]
    record["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in record:
            record[key] = [name for name in record[key] if name not in gone]
    write_text_atomic(root / RAY_SNAPSHOT, json.dumps(record))
    latest = record["latest_checkpoint_result"]
    log.warning("Ray Train's checkpoint record no longer lists %s (set aside or removed); its latest is now %s",
                ", ".join(sorted(gone)), latest["checkpoint_dir_name"] if latest else "none")
    return sorted(gone)
