"""Neurofinder challenge data sets (CodeNeuro, http://neurofinder.codeneuro.org): download and read.

Archive ``neurofinder.<id>.zip`` holds ``neurofinder.<id>/images/image00000.tiff ...`` (one 2D page per frame),
``info.json`` (``"rate-hz"``, indicator, ...) and, for training sets, ``regions/regions.json``: a list of
``{"coordinates": [[row, col], ...]}`` that becomes ROI masks. Test sets (ids ending ``.test``) have no regions.
Public archives: https://s3.amazonaws.com/neuro.datasets/challenges/neurofinder/neurofinder.<id>.zip
(listed in https://github.com/codeneuro/neurofinder, which publishes no checksums: ``manifest.json`` says so, and
each archive is pinned by its first download, see :mod:`cadiff.data.sources.download`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from cadiff.data.movie import Movie
from cadiff.data.sources.download import (
    GIB,
    check_base_url,
    check_id_list,
    fetch,
    load_manifest,
    manifest_pin,
    safe_extract_zip,
)
from cadiff.data.sources.tiff import read_tiff
from cadiff.errors import DataError
from cadiff.io import folder_lock

log = logging.getLogger(__name__)

BASE_URL = "https://s3.amazonaws.com/neuro.datasets/challenges/neurofinder"
ID_PATTERN = re.compile(r"\d\d\.\d\d(\.test)?")  # 00.00 (training) or 00.00.test (held-out test set)


def normalize_id(dataset_id: object) -> str:
    """``"NN.NN"`` id; a command line may have turned ``source.ids=[10.10]`` into the float 10.1."""
    text = str(dataset_id)
    if re.fullmatch(r"\d+(\.\d+)?", text) and not re.fullmatch(r"\d\d\.\d\d", text):
        return f"{float(text):05.2f}"
    return text


def check_ids(ids: list[object]) -> list[str]:
    """Normalized ids, each like ``00.00`` or ``00.00.test`` (they become file names and URLs); else ConfigError."""
    return check_id_list([normalize_id(i) for i in ids], ID_PATTERN, "00.00 or 00.00.test")


def archive_name(dataset_id: str) -> str:
    return f"neurofinder.{dataset_id}.zip"


def archive_url(dataset_id: str, base_url: str | None = None) -> str:
    return f"{(base_url or BASE_URL).rstrip('/')}/{archive_name(dataset_id)}"


def download(ids: list[object], cache_dir: str | Path, base_url: str | None = None, progress: bool = True,
             zip_max_total_bytes: int = 20 * GIB, zip_max_ratio: float = 200.0) -> list[Path]:
    """Download (verified, see :mod:`.download`) and extract Neurofinder archives; one data folder per id."""
    check_base_url(base_url)
    ids = check_ids(ids)
    cache_dir = Path(cache_dir)
    known = load_manifest()["neurofinder"]
    folders = []
    with folder_lock(cache_dir, "source.cache_dir"):
        for dataset_id in ids:
            name = archive_name(dataset_id)
            if base_url is None and name not in known:
                log.warning("neurofinder id %r is not a known challenge id %s", dataset_id, sorted(known))
            archive = fetch(archive_url(dataset_id, base_url), cache_dir / name, manifest_pin("neurofinder", name),
                            progress=progress)
            folder = safe_extract_zip(archive, cache_dir / f"neurofinder.{dataset_id}", zip_max_total_bytes,
                                      zip_max_ratio)
            folders.append(find_dataset_folder(folder))
    return folders


def find_dataset_folder(folder: Path) -> Path:
    """The folder holding ``images/``: ``folder`` itself or its single sub-folder (archives nest one level)."""
    if (folder / "images").is_dir():
        return folder
    candidates = [p for p in sorted(folder.iterdir()) if (p / "images").is_dir()] if folder.is_dir() else []
    if len(candidates) != 1:
        raise DataError(f"{folder}: expected a Neurofinder folder with images/ and info.json (found {len(candidates)})")
    return candidates[0]


def read_regions(path: Path, frame_shape: tuple[int, int]) -> np.ndarray:
    """``regions.json`` -> ``[N, H, W]`` bool masks (coordinates are [row, col])."""
    try:
        regions = json.loads(path.read_text())
        masks = np.zeros((len(regions), *frame_shape), dtype=bool)
        for i, region in enumerate(regions):
            coords = np.asarray(region["coordinates"], dtype=np.int64).reshape(-1, 2)
            inside = (coords >= 0).all(1) & (coords[:, 0] < frame_shape[0]) & (coords[:, 1] < frame_shape[1])
            masks[i, coords[inside, 0], coords[inside, 1]] = True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected a JSON list of {{'coordinates': [[row, col], ...]}} ({exc})") from exc
    return masks


def read_neurofinder(folder: str | Path, rate_hz: float | None = None) -> Movie:
    """Read an extracted Neurofinder data set (frames lazily, ROIs when present)."""
    folder = find_dataset_folder(Path(folder))
    info_path = folder / "info.json"
    if not info_path.is_file():
        raise DataError(f"{info_path}: missing; expected the Neurofinder info.json with 'rate-hz'")
    try:
        info = json.loads(info_path.read_text())
        file_rate = info.get("rate-hz", info.get("rate_hz"))
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{info_path}: expected a JSON object with 'rate-hz' ({exc})") from exc
    rate = rate_hz or file_rate
    if not rate:
        raise DataError(f"{info_path}: no 'rate-hz'; expected the frame rate (or set source.rate_hz)")
    movie = read_tiff(folder / "images", rate_hz=float(rate), source=folder.name)
    regions = folder / "regions" / "regions.json"
    movie.rois = read_regions(regions, movie.shape[1:]) if regions.is_file() else None
    movie.meta.update({"path": str(folder), "format": "neurofinder", "info": info})
    return movie
