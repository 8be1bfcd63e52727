"""Movie sources: one module per format; :func:`open_movie` picks the reader from a path."""

from __future__ import annotations

from pathlib import Path

from cadiff.data.movie import Movie
from cadiff.errors import DataError


def open_movie(path: str | Path, key: str | None = None, rate_hz: float | None = None) -> Movie:
    """Open a TIFF file/folder, HDF5 file (``key``, default ``data``), NWB file (``key``: the imaging series, when
    several), Thunder .bin folder or Neurofinder folder."""
    from cadiff.data.sources.hdf5 import HDF5_SUFFIXES, read_hdf5
    from cadiff.data.sources.neurofinder import read_neurofinder
    from cadiff.data.sources.thunder import read_thunder
    from cadiff.data.sources.tiff import TIFF_SUFFIXES, read_tiff

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".nwb":
        from cadiff.data.sources.nwb import read_nwb

        return read_nwb(path, series=key, rate_hz=rate_hz)
    if path.is_file() and path.suffix.lower() in HDF5_SUFFIXES:
        return read_hdf5(path, key=key or "data", rate_hz=rate_hz)
    if path.is_file() and path.suffix.lower() in TIFF_SUFFIXES:
        return read_tiff(path, rate_hz=rate_hz)
    if path.is_dir():
        if (path / "conf.json").is_file() and any(path.glob("*.bin")):
            return read_thunder(path, rate_hz=rate_hz)
        if (path / "images").is_dir() or (path / "info.json").is_file():
            return read_neurofinder(path, rate_hz=rate_hz)
        return read_tiff(path, rate_hz=rate_hz)
    raise DataError(f"{path}: not a movie; expected a .tif/.tiff/.h5/.hdf5/.nwb file, a folder of TIFF frames, "
                    "a Thunder .bin folder or a Neurofinder folder")
