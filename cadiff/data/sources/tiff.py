"""Generic TIFF movies: one multi-page file, or a folder of TIFF files (single pages or chunks) in name order.

Uncompressed contiguous files are memory-mapped (``tifffile.memmap``); anything else is read page by page on
demand, so no reader loads a whole movie. Big-endian files are converted to native byte order per chunk.
:func:`write_tiff` writes the ImageJ TIFFs cadiff outputs (samples, exports), with the frame interval.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from cadiff.data.movie import LazyFrames, Movie, read_frames
from cadiff.errors import DataError
from cadiff.io import atomic_path

log = logging.getLogger(__name__)

DEFAULT_RATE_HZ = 30.0  # typical resonant-scanning two-photon rate, used only when a file carries none
TIFF_SUFFIXES = (".tif", ".tiff")


def natural_key(path: Path) -> list:
    """Sort key that orders ``image2`` before ``image10``."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def tiff_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()), key=natural_key)


def _series_shape(tf: tifffile.TiffFile, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    if not tf.series:
        raise DataError(f"{path}: TIFF has no image series")
    series = tf.series[0]
    shape = tuple(int(s) for s in series.shape if s != 1) or (1,)
    if series.shape and series.shape[-2:] != shape[-2:]:
        shape = tuple(int(s) for s in series.shape)
    return shape, np.dtype(series.dtype)


def _rate_from_metadata(tf: tifffile.TiffFile) -> float | None:
    ij = tf.imagej_metadata or {}
    if ij.get("finterval"):
        return 1.0 / float(ij["finterval"])
    if ij.get("fps"):
        return float(ij["fps"])
    si = getattr(tf, "scanimage_metadata", None) or {}
    rate = (si.get("FrameData") or {}).get("SI.hRoiManager.scanFrameRate")
    return float(rate) if rate else None


# micrometres per length unit as ImageJ writes it (``unit=`` in the description, "\\u00B5m" escaped or not)
_UM_PER_UNIT = {"um": 1.0, "µm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "nm": 1e-3,
                "mm": 1e3}
# micrometres per TIFF ResolutionUnit: CENTIMETER only; INCH is left out (72 dpi is many writers' default)
_UM_PER_RESOLUTION_UNIT = {3: 1e4}
_OME_SIZE_RE = re.compile(r'PhysicalSizeX="([^"]+)"')
_OME_UNIT_RE = re.compile(r'PhysicalSizeXUnit="([^"]+)"')


def _pixel_size_from_metadata(tf: tifffile.TiffFile) -> float | None:
    """Pixel size in micrometres: ImageJ resolution + unit, OME ``PhysicalSizeX``, or a resolution in pixels/cm."""
    if tf.is_ome and tf.ome_metadata:
        size = _OME_SIZE_RE.search(tf.ome_metadata)
        unit = _OME_UNIT_RE.search(tf.ome_metadata)
        scale = _UM_PER_UNIT.get(unit.group(1).lower() if unit else "um")
        return float(size.group(1)) * scale if size and scale else None
    pixels_per_unit = float(tf.pages[0].resolution[0])
    if not pixels_per_unit > 0:
        return None
    ij_unit = (tf.imagej_metadata or {}).get("unit")
    if ij_unit is not None:
        scale = _UM_PER_UNIT.get(str(ij_unit).strip().lower())
    else:
        scale = _UM_PER_RESOLUTION_UNIT.get(int(tf.pages[0].resolutionunit))
    return scale / pixels_per_unit if scale else None


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _open(path: Path) -> tifffile.TiffFile:
    """Open a TIFF; a file tifffile only half-parses (it logs and truncates the page list) is a DataError."""
    handler = _Warnings()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(handler)
    try:
        tf = tifffile.TiffFile(path)
        pages = list(tf.pages)
    except (tifffile.TiffFileError, OSError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise DataError(f"{path}: not a readable TIFF file ({exc}); expected a multi-page TIFF movie") from exc
    finally:
        tiff_log.removeHandler(handler)
    bad = [m for m in handler.messages if any(w in m.lower() for w in ("invalid", "corrupt", "truncat"))]
    size = path.stat().st_size
    for page in pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            bad.append(f"page {page.index} data end beyond the end of the file ({max(ends)} > {size} bytes)")
            break
    if bad:
        tf.close()
        raise DataError(f"{path}: corrupt or truncated TIFF ({bad[0].splitlines()[-1].strip()}); expected a complete "
                        "multi-page TIFF movie")
    return tf


def _read_page(path: Path, index: int) -> np.ndarray:
    try:
        with tifffile.TiffFile(path) as tf:
            return tf.pages[index].asarray()
    except (tifffile.TiffFileError, OSError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise DataError(f"{path}: cannot read page {index} ({exc}); the file is corrupt or truncated") from exc


def _file_movie(path: Path) -> tuple[object, float | None, float | None]:
    """(lazy frames, frame rate in Hz, pixel size in micrometres) of one TIFF file; rate and size None if absent."""
    with _open(path) as tf:
        shape, dtype = _series_shape(tf, path)
        rate, pixel_um = _rate_from_metadata(tf), _pixel_size_from_metadata(tf)
        num_pages = len(tf.pages)
    if len(shape) == 2:
        raise DataError(f"{path}: a single 2D image {shape}, expected a movie [T, H, W] (multi-page TIFF)")
    if len(shape) != 3:
        raise DataError(f"{path}: image series of shape {shape}, expected a single-channel movie [T, H, W]")
    try:
        data = tifffile.memmap(path, mode="r")
        if tuple(data.shape) != shape:
            data = data.reshape(shape)
        return data, rate, pixel_um
    except (ValueError, OSError, tifffile.TiffFileError, EOFError):
        pass  # compressed, tiled or truncated: fall back to reading page by page
    if num_pages != shape[0]:
        # frames stored as samples of one page (tifffile's planar heuristic for 3-4 frames): small, load once
        with _open(path) as tf:
            return tf.series[0].asarray().reshape(shape), rate, pixel_um
    reader = LazyFrames(lambda i: _read_page(path, i), shape[0], shape[1:], dtype.newbyteorder("="), str(path))
    reader[-1]  # a truncated file fails here, at open time, naming the file
    return reader, rate, pixel_um


def _folder_movie(folder: Path) -> tuple[object, float | None, float | None]:
    """All TIFF files of a folder in name order: single 2D pages or multi-frame chunks, concatenated in time;
    the first frame rate and pixel size any file records."""
    files = tiff_files(folder)
    if not files:
        raise DataError(f"{folder}: no .tif/.tiff files; expected a TIFF movie or a folder of TIFF frames")
    parts: list[tuple[Path, object | None, int]] = []  # (file, lazy movie or None for a single page, frames)
    frame_shape, dtype, rate, pixel_um = None, None, None, None
    for path in files:
        with _open(path) as tf:
            shape, file_dtype = _series_shape(tf, path)
            rate = rate or _rate_from_metadata(tf)
            pixel_um = pixel_um or _pixel_size_from_metadata(tf)
        if len(shape) == 2:
            parts.append((path, None, 1))
        elif len(shape) == 3:
            data, _, _ = _file_movie(path)
            parts.append((path, data, shape[0]))
            shape = shape[1:]
        else:
            raise DataError(f"{path}: image series of shape {shape}, expected single-channel 2D frames")
        if frame_shape is None:
            frame_shape, dtype = tuple(shape), file_dtype
        elif tuple(shape) != frame_shape or file_dtype != dtype:
            raise DataError(f"{path}: frames {tuple(shape)} {file_dtype}, expected {frame_shape} {dtype} like {files[0].name}")
    index = [(k, j) for k, (_, _, n) in enumerate(parts) for j in range(n)]
    if len(index) < 2:
        raise DataError(f"{folder}: a single 2D image, expected a movie [T, H, W] (several frames)")

    def read(i: int) -> np.ndarray:
        k, j = index[i]
        path, data, _ = parts[k]
        return _read_page(path, 0) if data is None else read_frames(data, j, j + 1)[0]

    reader = LazyFrames(read, len(index), frame_shape, dtype.newbyteorder("="), str(folder))
    return reader, rate, pixel_um


def read_tiff(path: str | Path, rate_hz: float | None = None, source: str | None = None) -> Movie:
    """Read a multi-page TIFF file or a folder of TIFF frames/chunks as a lazy ``Movie``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such TIFF file or folder")
    data, file_rate, pixel_um = _folder_movie(path) if path.is_dir() else _file_movie(path)
    rate = rate_hz or file_rate
    if rate is None:
        log.warning("%s: no frame rate in the file; assuming %.1f Hz (set source.rate_hz)", path, DEFAULT_RATE_HZ)
        rate = DEFAULT_RATE_HZ
    return Movie(data=data, rate_hz=float(rate), source=source or path.stem, meta={"path": str(path), "format": "tiff"},
                 pixel_size_um=pixel_um)


def _imagej_tags(rate_hz: float, pixel_size_um: float | None) -> tuple[dict[str, Any], tuple[float, float] | None]:
    """ImageJ metadata and resolution: the frame interval in seconds and the playback rate (Fiji animates at
    ``fps``, not ``1/finterval``), and the pixel size in micrometres when known."""
    metadata: dict[str, Any] = {"axes": "TYX", "finterval": 1.0 / float(rate_hz), "fps": float(rate_hz)}
    if not pixel_size_um:
        return metadata, None
    metadata["unit"] = "um"
    return metadata, (1.0 / float(pixel_size_um), 1.0 / float(pixel_size_um))  # pixels per micrometre


def write_tiff(movie: np.ndarray, path: Path, rate_hz: float, pixel_size_um: float | None = None) -> Path:
    """Multi-page TIFF (uint16 or float32) with ImageJ metadata (:func:`_imagej_tags`), written atomically."""
    metadata, resolution = _imagej_tags(rate_hz, pixel_size_um)
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, movie, imagej=True, resolution=resolution, metadata=metadata)
    return path


def write_tiff_frames(frames: Iterable[np.ndarray], path: Path, shape: tuple[int, int, int], rate_hz: float,
                      dtype: np.dtype = np.uint16, pixel_size_um: float | None = None) -> Path:
    """Like :func:`write_tiff`, with the ``shape [T, H, W]`` frames taken from an iterable page by page (the movie
    never sits in memory); a count other than ``T`` is a DataError and leaves no file."""
    num_frames = int(shape[0])

    def pages() -> Iterator[np.ndarray]:
        count = 0
        for frame in frames:
            count += 1
            if count > num_frames or frame.shape != tuple(shape[1:]):
                raise DataError(f"TIFF '{path}': frame {count - 1} of shape {frame.shape}: expected {num_frames} "
                                f"frames of {tuple(shape[1:])}")
            yield np.asarray(frame, dtype=dtype)
        if count != num_frames:
            raise DataError(f"TIFF '{path}': got {count} frames, expected {num_frames}")

    metadata, resolution = _imagej_tags(rate_hz, pixel_size_um)
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, pages(), shape=tuple(shape), dtype=dtype, imagej=True, resolution=resolution,
                         metadata=metadata)
    return path
    return path
