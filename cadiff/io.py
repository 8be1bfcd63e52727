"""Atomic file and folder writes: a crash never leaves a half-written output visible under its final name."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cadiff.errors import ConfigError


def fsync_path(path: Path) -> None:
    """fsync a file or folder by path (a folder: so a rename inside it is durable); best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp file path beside ``final``; on success fsync and rename it into place, else delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        fsync_path(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


OUTPUT_MARKER = ".cadiff-output.json"  # written into every folder a job builds with atomic_dir


def check_output_dir(final: str | os.PathLike, job: str | None, overwrite: bool = False) -> None:
    """Refuse an ``out`` that this job may not replace: a file, or a non-empty folder that is not an earlier
    output of ``job`` (its marker), or an earlier output without ``overwrite``. Nothing is changed.
    ``job=None`` (an unmarked folder, such as an extracted download): only a new or empty folder."""
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise ConfigError(f"out '{final}' is a file or link; expected a new or empty folder (nothing was changed)")
    if not final.is_dir() or not any(final.iterdir()):
        return
    owner = _marker_job(final) if job is not None else None
    if owner is None:
        raise ConfigError(f"out '{final}' is a non-empty folder that no cadiff {job or 'job'} run wrote; choose a new or empty "
                          "folder (nothing was changed)")
    if owner != job:
        raise ConfigError(f"out '{final}' holds the output of cadiff {owner}, not {job}; choose another folder "
                          "(nothing was changed)")
    if not overwrite:
        raise ConfigError(f"out '{final}' holds an earlier {job} output; pass overwrite=true to replace it "
                          "(nothing was changed)")


def _marker_job(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / OUTPUT_MARKER).read_text())["job"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, job: str | None, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success mark it as ``job``'s output and swap it in.

    ``final`` is checked first (:func:`check_output_dir`): only an empty or missing folder, or an earlier output
    of the same job with ``overwrite``, is ever replaced; a failure leaves ``final`` as it was.
    """
    final = Path(final)
    check_output_dir(final, job, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; outputs get the usual permissions
    try:
        yield tmp
        commit_dir(tmp, final, job, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike, job: str | None, overwrite: bool = False) -> None:
    """Mark the finished folder ``tmp`` as ``job``'s output, fsync it and swap it in for ``final``.

    ``final`` is checked again (:func:`check_output_dir`): it may have changed while the job ran. ``tmp`` must
    be on the same file system as ``final`` (beside it), so the swap is two renames.
    """
    tmp, final = Path(tmp), Path(final)
    if job is not None:
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"job": job}) + "\n")
    check_output_dir(final, job, overwrite)
    for root, _dirs, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old)  # onto the new empty folder: only this job's earlier output moves
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


LOCK_NAME = ".cadiff.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


UNREADABLE_LOCK_STALE_S = 60  # a lock with no readable holder: a crash between create and write, once this old


def lock_is_stale(holder: dict, age_s: float) -> bool:
    """Whether a run lock may be taken over: its holder (the lock's JSON; {} when unreadable) is a process of this
    host that no longer runs, or it is unreadable and older than UNREADABLE_LOCK_STALE_S. A lock of another host
    is never guessed stale. Shared by :func:`folder_lock` and :func:`cadiff.storage.object_lock`."""
    if not holder:
        return age_s > UNREADABLE_LOCK_STALE_S
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return str(holder.get("host")) == socket.gethostname() and pid > 0 and not _pid_alive(pid)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``<folder>/.cadiff.lock`` (created with O_EXCL, holding host and pid) while the body runs.

    A second process that wants the same folder gets a ConfigError naming the holder. A lock left by a process
    of this host that no longer runs (a crash, SIGKILL) is stale and taken over; a lock of another host is never
    guessed at: its message says which file to remove once that run is known to be gone.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for _attempt in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                host, pid = str(holder["host"]), int(holder["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, host, pid = {}, "?", -1
            if lock_is_stale(holder, time.time() - lock.stat().st_mtime):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # its process is gone, or a crash left it unwritten
                continue
            raise ConfigError(f"{what} '{folder}' is in use by process {pid} on {host} (since "
                              f"{holder.get('started_utc', '?')}; lock file {lock}); wait for it to finish, or remove "
                              "the lock file once that process is gone") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise ConfigError(f"{what} '{folder}': could not take the lock {lock}")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(lock.read_text())["pid"] == me["pid"]:
                lock.unlink()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when still empty: a run that wrote nothing leaves no folder behind


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (a crash mid-append) is skipped, a torn earlier one raises."""
    return parse_jsonl(Path(path).read_text())


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """Records of JSON-lines text (see :func:`read_jsonl`)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise
    return out


def drop_torn_tail(path: str | os.PathLike) -> bool:
    """Cut a JSON-lines file after its last complete line (so appends start on a clean line); True if cut."""
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with open(path, "rb+") as fh:
        fh.truncate(data.rfind(b"\n") + 1)
    return True
