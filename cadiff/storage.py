"""Where runs and data live: local folders, or ``s3://``, ``gs://`` and ``file://`` URIs through pyarrow.fs.

One small surface for every place that reads or writes ``out_root``/``data.root``: parse a location, get its
file system, read/write bytes, list, check existence, open a shard for streaming, and move whole folders
between a local folder and the store (:func:`download_dir`, :func:`upload_dir`; :func:`mirrored`: a temp
copy of a store folder whose changes :meth:`Mirror.sync` uploads, the folder itself when local). Object
stores have no rename: a file is written locally and uploaded in one PUT, which readers see whole or not at
all; a folder upload puts ``last`` (an index) after everything else, so a reader that checks it first never
sees half a folder.

Credentials and endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS), so Ray workers started from
the same environment reach the same store. Local paths keep their plain ``pathlib``/``os`` behaviour.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cadiff.errors import CadiffError, ConfigError, StorageError
from cadiff.io import LOCK_NAME, lock_is_stale, write_bytes_atomic

SCHEMES = ("s3", "gs", "file")


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``<scheme>://...`` with a supported scheme; a ``://`` with another scheme is a ConfigError."""
    text = str(location)
    if "://" not in text:
        return False
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"location '{text}': scheme '{scheme}://' is not supported; expected a local path or one of "
                          f"{', '.join(s + '://' for s in SCHEMES)}")
    return True


def is_remote(location: str | os.PathLike) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``); ``file://`` and plain paths are local."""
    return is_uri(location) and not str(location).lower().startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """A local location (plain path or ``file://`` URI) as a Path; an object-store URI is a ConfigError."""
    text = str(location)
    if is_remote(text):
        raise ConfigError(f"location '{text}': expected a local path here, got an object-store URI")
    return Path(text[len("file://"):]) if text.lower().startswith("file://") else Path(text)


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a URI or local path (local: absolute path)."""
    import pyarrow.fs as pafs

    text = str(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(local_path(text).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError variants
        raise ConfigError(f"location '{text}': cannot open its file system ({_first_line(exc)}); check the URI and "
                          "the credentials/endpoint environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    return fs, path.rstrip("/")


def join(location: str | os.PathLike, *parts: str) -> str | Path:
    """``location/part/...``: a str for URIs (``Path`` would fold ``s3://`` into ``s3:/``), else a Path."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(location).joinpath(*parts)


def resolved(location: str | os.PathLike) -> str:
    """An absolute local path, or the URI as given (without a trailing slash)."""
    return str(location).rstrip("/") if is_remote(location) else str(local_path(location).resolve())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def _store_errors(location: str | os.PathLike, doing: str) -> Iterator[None]:
    """A missing object stays a FileNotFoundError (naming ``location``); any other store failure (network,
    credentials, permissions) becomes one StorageError line."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"'{location}': no such object") from None
    except OSError as exc:
        raise StorageError(f"'{location}': {doing} failed ({_first_line(exc)}); check the endpoint and credentials "
                           "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None


def _info(location: str | os.PathLike) -> Any:
    fs, path = filesystem(location)
    with _store_errors(location, "reaching the store"):
        return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    """A file or folder (an object-store prefix with objects under it) exists at ``location``."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return local_path(location).exists()
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    if not is_remote(location):
        return local_path(location).is_file()
    return _info(location).type == pafs.FileType.File


def mtime(location: str | os.PathLike) -> float | None:
    """Modification time (s) of a file, None when there is none."""
    if not is_remote(location):
        path = local_path(location)
        return path.stat().st_mtime if path.is_file() else None
    info = _info(location)
    return info.mtime.timestamp() if info.is_file and info.mtime is not None else None


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file; a missing one is a FileNotFoundError naming ``location``."""
    if not is_remote(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(location)
    with _store_errors(location, "reading"), fs.open_input_stream(path) as fh:
        return fh.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically: a temp file renamed into place, or one PUT to an object store."""
    if not is_remote(location):
        write_bytes_atomic(local_path(location), data)
        return
    fs, path = filesystem(location)
    with _store_errors(location, "writing"), fs.open_output_stream(path) as fh:
        fh.write(data)  # S3/GCS: the object appears only when the stream closes


def delete_file(location: str | os.PathLike) -> None:
    """Remove one file; a missing one is not an error."""
    if not is_remote(location):
        local_path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError), _store_errors(location, "deleting"):
        fs.delete_file(path)


LOCK_SETTLE_S = 1.0  # how long a new object-store lock is left before it is read back


@contextlib.contextmanager
def object_lock(location: str, what: str, settle_s: float = LOCK_SETTLE_S) -> Iterator[str]:
    """Hold ``<location>/.cadiff.lock`` in an object store while the body runs: the run lock of
    :func:`cadiff.io.folder_lock` where no exclusive create exists (pyarrow.fs has none; the last PUT wins).

    A lock naming a live holder refuses (ConfigError naming it); one of a process of this host that no longer
    runs is taken over; one of another host is never guessed stale. Otherwise this process writes its own (host,
    pid, a random token), waits ``settle_s`` and reads it back: of sessions that started together, every one
    whose token was overwritten refuses and the last writer goes on. Two sessions get past it only if one PUT
    lands more than ``settle_s`` after the other's check found no lock (seconds apart, not a shared second).
    The lock is removed at the end if it is still this process's.
    """
    lock = str(join(location, LOCK_NAME))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8),
          "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def holder() -> dict | None:
        try:
            found = json.loads(read_text(lock))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def refuse(found: dict) -> ConfigError:
        return ConfigError(f"{what} '{location}' is in use by process {found.get('pid', '?')} on "
                           f"{found.get('host', '?')} (since {found.get('started_utc', '?')}; lock object {lock}); "
                           "wait for it to finish, or delete the lock object once that process is gone")

    found = holder()
    if found is not None and not lock_is_stale(found, time.time() - (mtime(lock) or time.time())):
        raise refuse(found)
    write_bytes(lock, json.dumps(me).encode())
    time.sleep(settle_s)
    found = holder()
    if not found or found.get("token") != me["token"]:
        raise refuse(found or {})
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError, ValueError, CadiffError):
            if (holder() or {}).get("token") == me["token"]:
                delete_file(lock)


def open_input(location: str | os.PathLike) -> IO[bytes]:
    """A seekable binary file object (shards: tar headers are read in place, members streamed)."""
    if not is_remote(location):
        return open(local_path(location), "rb")  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(location)
    with _store_errors(location, "opening"):
        return fs.open_input_file(path)


def listdir(location: str | os.PathLike) -> list[str]:
    """Names directly under a folder (sorted); a missing folder lists nothing."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _store_errors(location, "listing"):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def _files_under(location: str | os.PathLike) -> dict[str, int]:
    """``{relative posix path: size}`` of every file below ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _store_errors(location, "listing"):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {info.path[len(path):].lstrip("/"): info.size for info in infos if info.is_file}


def download_dir(location: str | os.PathLike, dest: str | os.PathLike, exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy every file below ``location`` into the local folder ``dest`` (relative paths kept); files whose first
    path part is in ``exclude`` are skipped. Returns the relative paths copied."""
    fs, path = filesystem(location)
    dest = Path(dest)
    copied: list[str] = []
    with _transfer(f"downloading '{location}' to '{dest}'", copied):
        for rel in sorted(_files_under(location)):
            if rel.split("/", 1)[0] in exclude:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{path}/{rel}") as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            copied.append(rel)
    return copied


def local_files(src: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """``{relative posix path: (size, mtime_ns)}`` of the files below the local folder ``src``."""
    src = Path(src)
    found = {}
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if p.is_file() and rel.split("/", 1)[0] not in exclude:
            stat = p.stat()
            found[rel] = (stat.st_size, stat.st_mtime_ns)
    return found


def upload_dir(src: str | os.PathLike, location: str | os.PathLike, exclude: tuple[str, ...] = (),
               last: tuple[str, ...] = (), delete: bool = False,
               unchanged: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Copy the local folder ``src`` to ``location`` (``last`` names: after all others); files whose
    ``(size, mtime_ns)`` equals their entry in ``unchanged`` (what the store already holds) are skipped.
    ``delete``: remove files below ``location`` that ``src`` no longer has (outside ``exclude``). Returns the
    relative paths uploaded."""
    fs, path = filesystem(location)
    src = Path(src)
    have = _files_under(location) if delete else {}
    local = local_files(src, exclude)
    order = sorted(local, key=lambda rel: (rel in last, rel))
    sent: list[str] = []
    with _transfer(f"uploading '{src}' to '{location}'", sent):
        for rel in order:
            if unchanged is not None and unchanged.get(rel) == local[rel]:
                continue
            if not is_remote(location):
                fs.create_dir(f"{path}/{rel}".rsplit("/", 1)[0], recursive=True)
            with open(src / rel, "rb") as fh, fs.open_output_stream(f"{path}/{rel}") as out:
                shutil.copyfileobj(fh, out, 1 << 20)
            sent.append(rel)
        if delete:
            gone = [rel for rel in sorted(set(have) - set(local)) if rel.split("/", 1)[0] not in exclude]
            for rel in gone:
                fs.delete_file(f"{path}/{rel}")
            _drop_empty_dirs(fs, path, {f"{path}/{rel}".rsplit("/", 1)[0] for rel in gone})
    return sent


def _drop_empty_dirs(fs: Any, root: str, dirs: set[str]) -> None:
    """Remove the folders (and their emptied parents below ``root``) that deletions left empty: object stores
    keep a folder's marker object, which would list as a folder of nothing."""
    import pyarrow.fs as pafs

    for folder in sorted(dirs, key=len, reverse=True):
        while folder.startswith(root + "/"):
            if fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                break
            if fs.get_file_info(folder).type == pafs.FileType.Directory:
                fs.delete_dir(folder)
            folder = folder.rsplit("/", 1)[0]


@contextlib.contextmanager
def _transfer(what: str, done: list[str]) -> Iterator[None]:
    """Turn a store or disk failure mid-transfer into one StorageError saying how far it got."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{what} failed after {len(done)} file(s): {_first_line(exc)}") from None


class Mirror:
    """A local working folder for ``location``: the folder itself when local, else a temp copy whose changes
    :meth:`sync` uploads (``exclude``: top-level names left alone both ways; ``delete``: the store drops files
    the copy no longer has)."""

    def __init__(self, location: str | os.PathLike, local: Path, exclude: tuple[str, ...] = (),
                 delete: bool = False) -> None:
        self.location, self.local, self.exclude, self.delete = location, local, exclude, delete
        self.synced = local_files(local, exclude) if is_remote(location) else {}  # what the store holds

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def sync(self) -> list[str]:
        """Upload what changed in the copy (nothing to do for a local folder); returns the uploaded paths."""
        if not self.remote:
            return []
        now = local_files(self.local, self.exclude)
        sent = upload_dir(self.local, self.location, self.exclude, delete=self.delete, unchanged=self.synced)
        self.synced = now
        return sent


@contextlib.contextmanager
def mirrored(location: str | os.PathLike, exclude: tuple[str, ...] = (), delete: bool = False,
             download: bool = True, prefix: str = "cadiff-") -> Iterator[Mirror]:
    """A :class:`Mirror` of ``location`` (its files downloaded unless ``download=False``); a temp copy is
    removed on every exit, synced or not."""
    if not is_remote(location):
        yield Mirror(location, local_path(location), exclude, delete)
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if download:
            download_dir(location, tmp, exclude)
        yield Mirror(location, tmp, exclude, delete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
