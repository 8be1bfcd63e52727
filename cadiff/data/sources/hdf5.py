"""Generic HDF5 movies: one dataset ``[T, H, W]`` read lazily through h5py (any byte order, chunked or not)."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from cadiff.data.movie import Movie
from cadiff.errors import DataError

log = logging.getLogger(__name__)

RATE_ATTRS = ("rate_hz", "frame_rate", "frame_rate_hz", "fs", "sampling_rate")
# micrometres per pixel; element_size_um is the per-axis [.., y, x] spacing Fiji's HDF5 plugin and ilastik write
PIXEL_SIZE_ATTRS = ("pixel_size_um", "um_per_pixel", "element_size_um")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def open_dataset(path: str | Path, key: str) -> h5py.Dataset:
    """Open ``path[key]`` read-only; errors name the file, the key and the keys that exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such HDF5 file")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if key not in handle or not isinstance(handle[key], h5py.Dataset):
        datasets: list[str] = []
        handle.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        handle.close()
        raise DataError(f"{path}: no dataset '{key}' (set source.key); datasets in the file: {datasets}")
    return handle[key]


def _positive_attr(dataset: h5py.Dataset, names: tuple[str, ...]) -> float | None:
    """The last element of the first positive attribute named ``names`` on the dataset, then on the file."""
    for holder in (dataset.attrs, dataset.file.attrs):
        for name in names:
            if name in holder:
                value = np.asarray(holder[name]).ravel()
                if value.size and np.issubdtype(value.dtype, np.number) and float(value[-1]) > 0:
                    return float(value[-1])
    return None


def frame_rate(dataset: h5py.Dataset) -> float | None:
    """Frame rate from a dataset/file attribute, if one of the usual names is present."""
    return _positive_attr(dataset, RATE_ATTRS)


def pixel_size(dataset: h5py.Dataset) -> float | None:
    """Pixel size in micrometres from a dataset/file attribute (x spacing of ``element_size_um``), if present."""
    return _positive_attr(dataset, PIXEL_SIZE_ATTRS)


def read_hdf5(path: str | Path, key: str = "data", rate_hz: float | None = None, source: str | None = None,
              default_rate_hz: float = 30.0) -> Movie:
    """Read dataset ``key`` of an HDF5 file as a lazy ``Movie`` (``data`` is the open ``h5py.Dataset``)."""
    dataset = open_dataset(path, key)
    if dataset.ndim != 3:
        what = "a 2D image" if dataset.ndim == 2 else f"a {dataset.ndim}D array"
        raise DataError(f"{path}:{key}: {what} of shape {dataset.shape}, expected a movie [T, H, W]")
    rate = rate_hz or frame_rate(dataset)
    if rate is None:
        log.warning("%s: no frame-rate attribute; assuming %.1f Hz (set source.rate_hz)", path, default_rate_hz)
        rate = default_rate_hz
    return Movie(data=dataset, rate_hz=float(rate), source=source or Path(path).stem,
                 meta={"path": str(path), "key": key, "format": "hdf5"}, pixel_size_um=pixel_size(dataset))
