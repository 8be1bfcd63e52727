"""Verified, resumable HTTP downloads and bounded zip extraction shared by the public-archive sources.

Integrity: a download fills ``<dest>.part`` and becomes ``dest`` only once it is complete and matches its pin:
the size and sha256/md5 of the packaged ``manifest.json`` where a public source publishes them, else (trust on
first use) the size and sha256 that the file's first complete download recorded in
``<cache folder>/downloads.lock.json``. A cached file counts as "already downloaded" only when it matches its
pin; one without a pin (written before pins existed) is downloaded again.

Completeness: HTTP cannot tell a connection closed early from the end of a body sent without a length (no
Content-Length, not chunked), so such a body is never accepted: the length comes from Content-Length or
Content-Range, from the chunked framing's last chunk, or from the pin.

Resume: an interrupted download keeps ``<dest>.part`` and, in ``<dest>.part.json``, its URL and the validator
(strong ETag, else Last-Modified) of its first response. The next run asks for the rest with ``Range`` +
``If-Range``; a server that answers 200 (the file changed, or no Range support) restarts it from zero.

URLs: https only, plain http only for loopback hosts (the tests' local server), redirects held to the same rule.
Zip extraction refuses members that leave the folder, links, and archives that expand beyond a size cap or by a
zip-bomb ratio: checked from the headers before extracting and again on the bytes written.
"""

from __future__ import annotations

import email.message
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from cadiff.errors import ConfigError, DataError, DownloadError
from cadiff.io import atomic_dir, fsync_path, write_json_atomic

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
GIB = 1 << 30
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOCK_FILE = "downloads.lock.json"
MANIFEST = Path(__file__).with_name("manifest.json")
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "md5": re.compile(r"[0-9a-f]{32}")}
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


@dataclass(frozen=True)
class Pin:
    """What a complete file must be (None: not known); ``origin`` says where the values come from."""

    origin: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None

    @property
    def has_digest(self) -> bool:
        return bool(self.sha256 or self.md5)


# ---------------------------------------------------------------------------------------------------------
# URLs and ids


def url_problem(url: object) -> str | None:
    """Why ``url`` may not be downloaded from (None: it may): https, or http to a loopback host only."""
    parts = urllib.parse.urlsplit(str(url))
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if (scheme == "https" and host) or (scheme == "http" and host in LOOPBACK_HOSTS):
        return None
    if scheme in ("http", "https"):
        what = f"{scheme}:// to host {host!r}" if host else f"{scheme}:// without a host"
    else:
        what = f"scheme {scheme}://" if scheme else "a URL without a scheme"
    return f"an https:// URL (plain http:// only to {', '.join(LOOPBACK_HOSTS)}); {what} is refused"


def check_base_url(base_url: str | None, key: str = "source.base_url") -> None:
    """Raise ConfigError naming ``key`` unless ``base_url`` is None or allowed by :func:`url_problem`."""
    problem = None if base_url is None else url_problem(base_url)
    if problem:
        raise ConfigError(f"config key '{key}' = {base_url!r}: expected {problem}")


def check_id_list(ids: list[object], pattern: re.Pattern, example: str, key: str = "source.ids") -> list[str]:
    """``ids`` as strings, each matching ``pattern`` (they become file names and URLs); else ConfigError."""
    out = [str(i) for i in ids]
    bad = [i for i in out if not pattern.fullmatch(i)]
    if not out or bad:
        raise ConfigError(f"config key '{key}' = {out!r}: expected a non-empty list of ids like {example}"
                          + (f"; not an id: {bad[0]!r}" if bad else ""))
    return out


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL the https/loopback rule allows (a server could point at http:// or ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature, untyped there
        problem = url_problem(newurl)
        if problem:
            raise DownloadError(f"download of {req.full_url}: redirected to {newurl!r}; expected {problem}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_CheckedRedirects)


# ---------------------------------------------------------------------------------------------------------
# pins: the packaged manifest and the cache's lock file


def _entry_pin(entry: dict, origin: str) -> Pin:
    """A manifest/lock entry as a Pin; raises ValueError on a malformed value."""
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ValueError(f"size {size!r} is not a byte count")
    digests = {k: entry.get(k) for k in _HEX}
    for name, value in digests.items():
        if value is not None and not (isinstance(value, str) and _HEX[name].fullmatch(value)):
            raise ValueError(f"{name} {value!r} is not lower-case hex")
    return Pin(origin, size, **digests)


@functools.cache
def load_manifest(path: Path = MANIFEST) -> dict[str, dict[str, Pin]]:
    """``{source: {file name: Pin}}`` from the packaged manifest; an entry without values must say why."""
    out: dict[str, dict[str, Pin]] = {}
    try:
        for source, block in json.loads(path.read_text())["sources"].items():
            out[source] = {}
            for name, entry in block["files"].items():
                pinned = entry.get("sha256") is not None or entry.get("md5") is not None
                if not entry.get("source" if pinned else "why"):
                    raise ValueError(f"{source}/{name}: a digest needs its 'source', a null one its 'why'")
                out[source][name] = _entry_pin(entry, f"the manifest {path}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed download manifest ({exc}); expected {{'sources': {{source: {{'files': "
                        "{name: {'size', 'sha256', 'md5', 'source' or 'why'}}}}}") from exc
    return out


def manifest_pin(source: str, name: str) -> Pin | None:
    """The manifest's pin of ``source``'s file ``name``; None when it pins neither a size nor a digest."""
    pin = load_manifest().get(source, {}).get(name)
    return pin if pin is not None and (pin.has_digest or pin.size is not None) else None


def _read_lock(lock: Path) -> dict[str, dict]:
    if not lock.exists():
        return {}
    try:
        files = json.loads(lock.read_text())["files"]
        for entry in files.values():
            pin = _entry_pin(entry, str(lock))
            if pin.size is None or pin.sha256 is None:
                raise ValueError("an entry lacks size or sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DownloadError(f"{lock}: unreadable download lock file ({exc}); expected {{'files': {{name: {{'size', "
                            "'sha256'}}}; delete it to trust the next downloads afresh") from exc
    return files


def lock_pin(dest: Path) -> Pin | None:
    """The size and sha256 that ``dest``'s first complete download recorded (None: no record)."""
    lock = dest.parent / LOCK_FILE
    entry = _read_lock(lock).get(dest.name)
    return None if entry is None else _entry_pin(entry, f"{lock} (recorded by its first download)")


def record_download(dest: Path, size: int, sha256: str, url: str) -> None:
    """Record ``dest``'s size and sha256 in the cache's lock file (trust on first use)."""
    lock = dest.parent / LOCK_FILE
    files = _read_lock(lock)
    files[dest.name] = {"size": size, "sha256": sha256, "url": url,
                        "recorded_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(lock, {"files": files})


def _digests(path: Path, md5: bool) -> tuple[str, str | None]:
    sha = hashlib.sha256()
    mdh = hashlib.md5(usedforsecurity=False) if md5 else None
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            sha.update(block)
            if mdh is not None:
                mdh.update(block)
    return sha.hexdigest(), (mdh.hexdigest() if mdh is not None else None)


def verify(path: Path, pin: Pin, then: str) -> str:
    """Raise DownloadError (ending with ``then``) unless ``path`` matches ``pin``; return its sha256."""
    size = path.stat().st_size
    if pin.size is not None and size != pin.size:
        raise DownloadError(f"{path}: {size} bytes, expected {pin.size} from {pin.origin}; {then}")
    sha256, md5 = _digests(path, pin.md5 is not None)
    for name, want, got in (("sha256", pin.sha256, sha256), ("md5", pin.md5, md5)):
        if want is not None and got != want:
            raise DownloadError(f"{path}: {name} {got} does not match {want} from {pin.origin}; {then}")
    return sha256


# ---------------------------------------------------------------------------------------------------------
# HTTP


def _open(url: str, headers: dict[str, str], timeout_s: float) -> http.client.HTTPResponse | urllib.error.HTTPError:
    """The response, or the 416 HTTPError of a Range request (the caller decides); other failures raise."""
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and "Range" in headers:
            return exc  # Range not satisfiable: the .part may already hold the whole file
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"download of {url} failed: {reason}; check the network or source.base_url") from exc


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``*`` parts and malformed headers give None."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        return None, None
    return (int(match[1]) if match[1] else None), (int(match[2]) if match[2] != "*" else None)


def _validator(headers: email.message.Message) -> str | None:
    """A validator If-Range may carry: a strong ETag, else Last-Modified (weak ETags are not allowed there)."""
    etag = headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _resume_from(part: Path, meta: Path, url: str) -> tuple[int, str | None]:
    """(bytes already in ``part``, its validator) when it can be resumed; else (0, None), the stale part removed."""
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        info = None  # no or unreadable resume record: the .part cannot be trusted to continue
    if part.exists() and isinstance(info, dict) and info.get("url") == url and info.get("validator"):
        return part.stat().st_size, str(info["validator"])
    if part.exists():
        log.info("%s: no resume record for %s: downloading from the start", part, url)
    _discard(part, meta)
    return 0, None


@dataclass
class _Transfer:
    """One download attempt: where it writes, from which byte, and what it knows of the total."""

    url: str
    part: Path
    meta: Path
    start: int
    total: int | None
    chunked: bool
    resumable: bool


def _begin(url: str, part: Path, meta: Path, pin: Pin | None, timeout_s: float,
           fresh: bool) -> tuple[http.client.HTTPResponse | None, _Transfer]:
    """Open the request (resuming ``part`` unless ``fresh``); return (response or None when complete, _Transfer)."""
    start, validator = (0, None) if fresh else _resume_from(part, meta, url)
    response = _open(url, {"Range": f"bytes={start}-", "If-Range": validator} if start else {}, timeout_s)
    status = getattr(response, "status", None) or response.code
    if status == 416:
        response.close()
        _, total = _content_range(response.headers.get("Content-Range"))
        if total == start:  # the .part already holds the whole file
            return None, _Transfer(url, part, meta, start, total, False, True)
        return _restart(url, part, meta, pin, timeout_s, fresh, f"server has {total} bytes, the .part {start}")
    if status not in (200, 206):
        response.close()
        raise DownloadError(f"download of {url}: unexpected HTTP {status}; expected 200 or 206")
    chunked = bool(getattr(response, "chunked", False))
    if status == 206:
        first, total = _content_range(response.headers.get("Content-Range"))
        if first != start:
            response.close()
            return _restart(url, part, meta, pin, timeout_s, fresh, f"asked from byte {start}, got {first}")
    else:
        if start:
            log.info("%s: the server sent the whole file (changed since the interrupted download, or no Range "
                     "support): restarting from zero", url)
        length = response.headers.get("Content-Length")
        start, validator = 0, _validator(response.headers)
        total = int(length) if length and length.isdigit() and not chunked else None
        if validator:
            write_json_atomic(meta, {"url": url, "validator": validator})
        else:
            _discard(meta)
    try:
        _check_total(url, part, meta, pin, total)
    except DownloadError:
        response.close()
        raise
    if total is None and pin is not None:
        total = pin.size
    return response, _Transfer(url, part, meta, start, total, chunked, bool(validator))


def _restart(url: str, part: Path, meta: Path, pin: Pin | None, timeout_s: float, fresh: bool,
             why: str) -> tuple[http.client.HTTPResponse | None, _Transfer]:
    if fresh:
        raise DownloadError(f"download of {url}: the server's answer to a plain request makes no sense ({why})")
    log.info("%s: cannot resume (%s): downloading from the start", url, why)
    _discard(part, meta)
    return _begin(url, part, meta, pin, timeout_s, fresh=True)


def _check_total(url: str, part: Path, meta: Path, pin: Pin | None, total: int | None) -> None:
    if pin is not None and pin.size is not None and total is not None and total != pin.size:
        _discard(part, meta)
        raise DownloadError(f"download of {url}: the server has {total} bytes, expected {pin.size} from {pin.origin} "
                            "(the file changed on the server, or this is the wrong URL); nothing was kept")


def _receive(response: http.client.HTTPResponse, job: _Transfer, progress: bool) -> None:
    """Append the body to ``job.part``; any failure keeps the .part only when it can be resumed."""
    from tqdm.auto import tqdm

    try:
        with response, open(job.part, "ab" if job.start else "wb") as fh, \
                tqdm(total=job.total, initial=job.start, unit="B", unit_scale=True, desc=job.part.name,
                     disable=not progress) as bar:
            for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                fh.write(block)
                bar.update(len(block))
                if job.total is not None and fh.tell() > job.total:
                    raise DownloadError(f"download of {job.url}: the server sent more than the {job.total} bytes "
                                        "expected; nothing was kept")
    except (OSError, http.client.HTTPException) as exc:
        size = job.part.stat().st_size if job.part.exists() else 0
        if not job.resumable:
            _discard(job.part, job.meta)
        then = "re-run to resume" if job.resumable else "the server gave no validator to resume with, re-run to restart"
        raise DownloadError(f"download of {job.url} stopped after {size} bytes ({exc}); {then}") from exc
    except BaseException:
        if not job.resumable or (job.total is not None and job.part.exists() and job.part.stat().st_size > job.total):
            _discard(job.part, job.meta)
        raise


def _check_complete(job: _Transfer) -> None:
    size = job.part.stat().st_size
    if job.total is None and not job.chunked:
        _discard(job.part, job.meta)
        raise DownloadError(f"download of {job.url}: the server sent no length (no Content-Length or Content-Range, "
                            f"not chunked) and no size is pinned, so a connection closed early cannot be told from "
                            f"the end of the file; refusing to cache it ({size} bytes discarded)")
    if job.total is not None and size != job.total:
        then = "re-run to resume" if job.resumable else "re-run to download again"
        if not job.resumable:
            _discard(job.part, job.meta)
        raise DownloadError(f"download of {job.url}: got {size} of {job.total} bytes (connection closed early); {then}")


def fetch(url: str, dest: str | os.PathLike, pin: Pin | None = None, timeout_s: float = 60.0,
          progress: bool = True) -> Path:
    """Return ``dest`` once it holds ``url`` verified against ``pin`` (a manifest's; else the lock file's record).

    A cached ``dest`` that matches is not fetched again; a download resumes its ``.part`` when it can, must be
    complete, must match the pin, and is recorded in the lock file when no digest was pinned (trust on first use).
    """
    problem = url_problem(url)
    if problem:
        raise DownloadError(f"download URL {url!r}: expected {problem}")
    dest = Path(dest)
    expected = pin if pin is not None and pin.has_digest else (lock_pin(dest) or pin)
    if dest.exists():
        if expected is not None and expected.has_digest:
            verify(dest, expected, "the cached file was kept; delete it to download it again")
            log.info("already downloaded and verified: %s", dest)
            return dest
        log.warning("%s has no recorded size and digest (an older download?): downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")
    response, job = _begin(url, part, meta, expected, timeout_s, fresh=False)
    if response is not None:
        _receive(response, job, progress)
    _check_complete(job)
    try:
        sha256 = verify(part, expected or Pin("no pin"), "the download was removed")
    except DownloadError:
        _discard(part, meta)
        raise
    if expected is None or not expected.has_digest:
        record_download(dest, part.stat().st_size, sha256, url)
    fsync_path(part)
    os.replace(part, dest)
    _discard(meta)
    fsync_path(dest.parent)
    return dest


# ---------------------------------------------------------------------------------------------------------
# zip extraction


def _member_parts(archive: Path, info: zipfile.ZipInfo) -> tuple[str, ...]:
    name = PurePosixPath(info.filename.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts or (name.parts and name.parts[0].endswith(":")):
        raise DataError(f"{archive}: unsafe member path {info.filename!r} (absolute or '..'), refusing to extract")
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        raise DataError(f"{archive}: member {info.filename!r} is a symbolic link, refusing to extract")
    return name.parts


@dataclass
class _Expansion:
    """The bytes an archive may expand to: ``max_total_bytes`` and ``max_ratio`` times its size on disk."""

    archive: Path
    max_total_bytes: int
    max_ratio: float
    written: int = 0

    def check(self, total: int, what: str) -> None:
        packed = max(self.archive.stat().st_size, 1)
        if total > self.max_total_bytes:
            raise DataError(f"{self.archive}: {what} {total} bytes, over the cap of {self.max_total_bytes} bytes "
                            f"({self.max_total_bytes / GIB:.3g} GiB, source.zip_max_total_gib); refusing to extract")
        if total > self.max_ratio * packed:
            raise DataError(f"{self.archive}: {what} {total} bytes from {packed} ({total / packed:.0f}x), over "
                            f"source.zip_max_ratio={self.max_ratio:g}: a zip bomb; refusing to extract")

    def take(self, nbytes: int, member_bytes: int, info: zipfile.ZipInfo) -> None:
        """Count bytes really written: headers can lie, so the caps hold on the output too."""
        self.written += nbytes
        if member_bytes > info.file_size:
            raise DataError(f"{self.archive}: member {info.filename!r} expands beyond the {info.file_size} bytes its "
                            "header declares; refusing to extract")
        self.check(self.written, "writes")


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, budget: _Expansion) -> None:
    target = root.joinpath(*_member_parts(budget.archive, info))
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as dst:
        for block in iter(lambda: src.read(CHUNK_BYTES), b""):
            budget.take(len(block), dst.tell() + len(block), info)
            dst.write(block)


def safe_extract_zip(archive: str | os.PathLike, out_dir: str | os.PathLike, max_total_bytes: int = 20 * GIB,
                     max_ratio: float = 200.0) -> Path:
    """Extract ``archive`` into ``out_dir`` atomically; refuse escaping paths, links and zip bombs.

    The expansion is capped at ``max_total_bytes`` and at ``max_ratio`` times the archive's size (TIFF movies
    deflate about 1-3x; a bomb, 1000x): checked on the declared sizes first, then on the bytes written.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    if out_dir.exists():
        return out_dir
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc}); delete it to download again") from exc
    budget = _Expansion(archive, max_total_bytes, max_ratio)
    with zf:
        members = zf.infolist()
        for info in members:
            _member_parts(archive, info)
        budget.check(sum(info.file_size for info in members), "declares")
        with atomic_dir(out_dir, None) as tmp:  # a cache folder: no marker, never an existing one
            for info in members:
                try:
                    _extract_member(zf, info, tmp, budget)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                    raise DataError(f"{archive}: member {info.filename!r} is corrupt or unsupported ({exc}); delete "
                                    "the archive to download again") from exc
    return out_dir
