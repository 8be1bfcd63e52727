"""Thunder "images" folders: ``conf.json`` ({"dims", "dtype"}) plus one headerless binary file per frame.

Used by the thunder-project example data (``shared/data/real/thunder_mouse``: 500 frames of 64x64 int16,
little-endian). Thunder lists ``dims`` fastest-changing first, so a frame file reshaped in C order is
``[dims[1], dims[0]]`` = ``[H, W]`` with W contiguous.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cadiff.data.movie import LazyFrames, Movie
from cadiff.data.sources.tiff import natural_key
from cadiff.errors import DataError

DEFAULT_RATE_HZ = 30.0  # the example data set records no rate


def read_thunder(folder: str | Path, rate_hz: float | None = None, byteorder: str = "<",
                 source: str | None = None) -> Movie:
    """Read a Thunder binary-frames folder lazily as a ``Movie``."""
    folder = Path(folder)
    conf_path = folder / "conf.json"
    try:
        conf = json.loads(conf_path.read_text())
        dims = [int(d) for d in conf["dims"]]
        dtype = np.dtype(conf["dtype"]).newbyteorder(byteorder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{conf_path}: expected JSON {{'dims': [W, H], 'dtype': ...}} ({exc})") from exc
    if len(dims) != 2:
        raise DataError(f"{conf_path}: dims {dims}, expected two (2D frames)")
    files = sorted(folder.glob("*.bin"), key=natural_key)
    if len(files) < 2:
        raise DataError(f"{folder}: {len(files)} .bin frame files, expected a movie of several frames")
    frame_shape = (dims[1], dims[0])
    nbytes = int(np.prod(frame_shape)) * dtype.itemsize
    for path in files:
        if path.stat().st_size != nbytes:
            raise DataError(f"{path}: {path.stat().st_size} bytes, expected {nbytes} ({frame_shape} {dtype})")

    def read(i: int) -> np.ndarray:
        return np.fromfile(files[i], dtype=dtype).reshape(frame_shape)

    data = LazyFrames(read, len(files), frame_shape, dtype.newbyteorder("="), str(folder))
    return Movie(data=data, rate_hz=float(rate_hz or DEFAULT_RATE_HZ), source=source or folder.name,
                 meta={"path": str(folder), "format": "thunder", "rate_known": rate_hz is not None})
