"""Resumable HTTP downloads and safe zip extraction shared by the public-archive sources.

A download goes to ``<dest>.part`` and is renamed to ``dest`` only after its size (and, when known, sha256)
checked out, so an existing ``dest`` is always complete and is skipped. An interrupted download resumes
from the ``.part`` file with an HTTP ``Range`` request (a server that ignores Range restarts it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from cadiff.errors import DataError, DownloadError
from cadiff.io import atomic_dir

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _total_size(response, start: int) -> int | None:
    content_range = response.headers.get("Content-Range")  # "bytes 100-199/200"
    if content_range and "/" in content_range and not content_range.endswith("*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) + start if length is not None else None


def fetch(url: str, dest: str | os.PathLike, expected_size: int | None = None, sha256: str | None = None,
          timeout_s: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (skip when complete, resume a ``.part`` file); return ``dest``."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.exists():
        if expected_size is None or dest.stat().st_size == expected_size:
            log.info("already downloaded: %s", dest)
            return dest
        log.warning("%s has %d bytes, expected %d: downloading again", dest, dest.stat().st_size, expected_size)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - URL comes from config
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the .part already holds everything the server has
            response = None
        else:
            raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"download of {url} failed: {exc}; check the network or source.base_url") from exc
    total = expected_size
    if response is not None:
        with response:
            if start and response.status != 206:
                log.info("server ignored the Range request for %s: restarting", url)
                start = 0
            total = total or _total_size(response, start)
            mode = "ab" if start else "wb"
            with open(part, mode) as fh, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                              desc=dest.name, disable=not progress) as bar:
                try:
                    for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                        fh.write(block)
                        bar.update(len(block))
                except (OSError, urllib.error.URLError) as exc:
                    raise DownloadError(f"download of {url} interrupted after {fh.tell()} bytes ({exc}); "
                                        "re-run to resume") from exc
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"download of {url}: got {size} bytes, expected {total}; re-run to resume")
    if sha256 is not None and _sha256(part) != sha256.lower():
        part.unlink()
        raise DownloadError(f"download of {url}: sha256 mismatch (expected {sha256}); the partial file was removed")
    os.replace(part, dest)
    return dest


def safe_extract_zip(archive: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Extract ``archive`` into ``out_dir`` atomically; reject absolute paths, ``..`` and links."""
    archive, out_dir = Path(archive), Path(out_dir)
    if out_dir.exists():
        return out_dir
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc}); delete it to download again") from exc
    with zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and name.parts[0].endswith(":")):
                raise DataError(f"{archive}: unsafe member path {info.filename!r} (absolute or '..'), refusing to extract")
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:
                raise DataError(f"{archive}: member {info.filename!r} is a symbolic link, refusing to extract")
        bad = zf.testzip() if zf.infolist() else None
        if bad is not None:
            raise DataError(f"{archive}: member {bad!r} fails its CRC check (corrupt archive)")
        with atomic_dir(out_dir, None) as tmp:  # a cache folder: no marker, never an existing one
            for info in zf.infolist():
                target = tmp.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
    return out_dir
