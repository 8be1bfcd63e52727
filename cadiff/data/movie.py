"""Movie container (lazy array + metadata) and the photon-unit normalization shared by every stage.

A ``Movie`` wraps a ``[T, H, W]`` array that may live on disk (``np.memmap``, ``h5py.Dataset`` or a lazy
stack of per-frame files); code reads it in frame chunks with :func:`read_frames`, so a 2000x512x512 movie
never becomes a float copy in memory.

Normalization (DESIGN.md, "Normalization is per-source"): ADU -> photons ``p = (x - offset) / gain``, then
``f(p)`` with ``f`` the identity (``kind="photon"``) or the generalized Anscombe transform (``kind="anscombe"``,
read noise in photon units), then ``(f(p) - center) / scale``. :func:`denormalize` is its exact algebraic
inverse up to rounding to integer ADU.

A source without a photon calibration (``prepare_data source.calibration=none``) is normalized in its own units
(``kind="raw"``): the robust z-score ``p = (x - raw.center) / raw.scale`` (median and MAD-based scale) takes the
place of photons, ``f`` is the identity. Integer movies are stored as they are; a float movie is stored on the
integer grid ``(x - raw.zero) / raw.step`` (:func:`to_stored_units`), which :func:`to_source_units` inverts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cadiff.data.anscombe import anscombe, inverse_anscombe, inverse_anscombe_unbiased
from cadiff.errors import DataError

UINT16_MAX = 65535
# photon / anscombe: photon units from the source's gain and offset; raw: robust z-scores in the source's own units
NORMALIZATION_KINDS = ("photon", "anscombe", "raw")
MOVIE_DTYPES = (np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.float32), np.dtype(np.float64),
                np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.uint32))


class LazyFrames:
    """Array-like ``[T, H, W]`` stack whose frames are read on demand by ``read_frame(i) -> [H, W]``.

    Subclasses that read several frames at once override :meth:`_frames`; indexing (an int, a slice or a list of
    frames, optionally followed by spatial indices) is shared."""

    def __init__(self, read_frame: Callable[[int], np.ndarray], num_frames: int, frame_shape: tuple[int, int],
                 dtype: np.dtype, describe: str = "frames") -> None:
        self._read_frame = read_frame
        self.shape = (int(num_frames), int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = np.dtype(dtype)
        self.ndim = 3
        self.describe = describe

    def __len__(self) -> int:
        return self.shape[0]

    def _frame(self, i: int) -> np.ndarray:
        frame = np.asarray(self._read_frame(i))
        if frame.shape != self.shape[1:]:
            raise DataError(f"{self.describe}: frame {i} has shape {frame.shape}, expected {self.shape[1:]} "
                            "like the first frame")
        return frame.astype(self.dtype, copy=False)

    def _frames(self, indices: np.ndarray) -> np.ndarray:
        """Frames ``indices`` (in any order, repeats allowed) as ``[len(indices), H, W]``."""
        out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        for k, i in enumerate(indices):
            out[k] = self._frame(int(i))
        return out

    def __getitem__(self, item: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(item, tuple):
            item, rest = item[0], item[1:]
        if isinstance(item, (int, np.integer)):
            i = int(item) + (self.shape[0] if item < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"frame {item} out of range for {self.shape[0]} frames")
            out = self._frames(np.array([i]))[0]
            return out[rest] if rest else out
        indices = np.arange(self.shape[0])[item] if isinstance(item, slice) else np.asarray(item, dtype=np.int64)
        out = self._frames(indices)
        return out[(slice(None), *rest)] if rest else out


@dataclass
class Movie:
    """A calcium-imaging movie ``[T, H, W]`` (possibly lazy) with frame rate, calibration and ROIs."""

    data: Any
    rate_hz: float
    source: str
    gain: float | None = None  # ADU per photon
    offset: float | None = None  # ADU at zero photons
    read_noise: float | None = None  # ADU (std of the Gaussian detector noise)
    rois: np.ndarray | None = None  # [N, H, W] bool
    meta: dict = field(default_factory=dict)
    pixel_size_um: float | None = None  # square pixels' side in micrometres, when the source records it

    def __post_init__(self) -> None:
        shape = tuple(getattr(self.data, "shape", ()))
        if len(shape) != 3:
            what = "a 2D image" if len(shape) == 2 else f"a {len(shape)}D array"
            raise DataError(f"{self.source}: expected a movie [T, H, W], got {what} of shape {shape}")
        if min(shape) < 1:
            raise DataError(f"{self.source}: empty movie of shape {shape}")
        if np.dtype(self.data.dtype).newbyteorder("=") not in MOVIE_DTYPES:
            raise DataError(f"{self.source}: unsupported movie dtype {self.data.dtype}, expected uint16, int16 "
                            "or float32")
        if not self.rate_hz or self.rate_hz <= 0:
            raise DataError(f"{self.source}: frame rate {self.rate_hz!r} Hz, expected > 0 (set source.rate_hz)")
        if self.pixel_size_um is not None and not (np.isfinite(self.pixel_size_um) and self.pixel_size_um > 0):
            raise DataError(f"{self.source}: pixel size {self.pixel_size_um!r} um, expected a positive number")
        if self.rois is not None and tuple(self.rois.shape[1:]) != shape[1:]:
            raise DataError(f"{self.source}: ROI masks {self.rois.shape} do not match frames {shape[1:]}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def num_frames(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> np.dtype:
        """Native-byte-order dtype of the frames as :func:`read_frames` returns them."""
        return np.dtype(self.data.dtype).newbyteorder("=")

    def calib(self) -> dict:
        return {"gain": self.gain, "offset": self.offset, "read_noise": self.read_noise}

    def frames(self, t0: int, t1: int) -> np.ndarray:
        """Frames ``[t0, t1)`` as an in-memory native-endian array."""
        return read_frames(self.data, t0, t1)


def read_frames(data: Any, t0: int, t1: int) -> np.ndarray:
    """Read frames ``[t0, t1)`` of a (lazy) ``[T, H, W]`` array into memory, native byte order.

    A C-contiguous ``np.memmap`` is read with plain file reads instead of through the mapping, so touched pages
    are not kept resident: streaming a 1 GB memmapped movie stays at the size of one chunk in RSS.
    """
    t0, t1 = max(0, int(t0)), min(int(data.shape[0]), int(t1))
    if isinstance(data, np.memmap) and data.flags.c_contiguous and isinstance(data.filename, str):
        frame_bytes = int(np.prod(data.shape[1:])) * data.dtype.itemsize
        out = np.empty((t1 - t0, *data.shape[1:]), dtype=data.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        with open(data.filename, "rb", buffering=0) as fh:
            fh.seek(int(data.offset) + t0 * frame_bytes)
            got = 0
            while got < len(buf):
                n = fh.readinto(buf[got:])
                if not n:
                    raise DataError(f"{data.filename}: file ends before frame {t1}, truncated movie")
                got += n
    else:
        try:
            out = np.asarray(data[t0:t1])
        except DataError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DataError(f"cannot read frames {t0}:{t1} of {describe_source(data)}: {exc}") from exc
    if out.dtype.byteorder not in ("=", "|"):
        out = out.astype(out.dtype.newbyteorder("="))
    return out


def describe_source(data: Any) -> str:
    for attr in ("filename", "describe", "name"):
        value = getattr(data, attr, None)
        if isinstance(value, str):
            fname = getattr(getattr(data, "file", None), "filename", None)
            return f"{fname}:{value}" if attr == "name" and fname else value
    return type(data).__name__


# ---------------------------------------------------------------------------------------------------------
# photon units and normalization


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def to_photons(x: Any, gain: float, offset: float) -> Any:
    """ADU -> photons: ``(x - offset) / gain`` (float32 for integer numpy input; torch stays torch)."""
    if _is_torch(x):
        return (x.float() - offset) / gain
    return (np.asarray(x, dtype=np.float32) - np.float32(offset)) / np.float32(gain)


def _read_noise_photons(calib: dict) -> float:
    rn, gain = calib.get("read_noise"), calib["gain"]
    return float(rn) / float(gain) if rn else 0.0


def _unit_map(calib: dict, kind: str) -> tuple[float, float]:
    """``(offset, per_unit)`` of ``unit = (stored - offset) / per_unit``: photons, or robust z-scores (``raw``)."""
    if kind == "raw":
        raw = calib["raw"]
        return (raw["center"] - raw["zero"]) / raw["step"], raw["scale"] / raw["step"]
    return float(calib["offset"]), float(calib["gain"])


def normalize(x_adu: Any, calib: dict, norm: dict) -> Any:
    """Stored values -> normalized float32: ``(f(unit) - center) / scale`` (see module docstring)."""
    _check_norm(calib, norm)
    offset, per_unit = _unit_map(calib, norm["kind"])
    p = to_photons(x_adu, per_unit, offset)  # the same affine map for photons and for raw z-scores
    if norm["kind"] == "anscombe":
        p = anscombe(p, _read_noise_photons(calib))
    out = (p - float(norm["center"])) / float(norm["scale"])
    return out.float() if _is_torch(out) else np.asarray(out, dtype=np.float32)


def denormalize(x: Any, calib: dict, norm: dict, estimate: bool = False) -> np.ndarray:
    """Normalized values -> uint16 stored values: exact inverse of :func:`normalize` up to rounding, clipped to uint16.

    ``estimate``: ``x`` is a signal estimate ``E[f(x)]`` (a denoiser's output), inverted with the unbiased
    inverse of the Anscombe transform so that it is an estimate of the photon flux itself.
    :func:`to_source_units` takes the result to the source's own units.
    """
    _check_norm(calib, norm)
    if _is_torch(x):
        x = x.detach().float().cpu().numpy()
    f = np.asarray(x, dtype=np.float64) * float(norm["scale"]) + float(norm["center"])
    if norm["kind"] == "anscombe":
        invert = inverse_anscombe_unbiased if estimate else inverse_anscombe
        f = invert(f, _read_noise_photons(calib))
    offset, per_unit = _unit_map(calib, norm["kind"])
    adu = f * per_unit + offset
    return np.clip(np.rint(adu), 0, UINT16_MAX).astype(np.uint16)


def _raw_grid(calib: dict) -> tuple[float, float] | None:
    """``(zero, step)`` of a raw-unit source stored on a grid other than its own integers, else None."""
    raw = calib.get("raw")
    if not raw or (raw["zero"] == 0 and raw["step"] == 1):
        return None
    return float(raw["zero"]), float(raw["step"])


def to_stored_units(x_source: np.ndarray, calib: dict) -> np.ndarray:
    """Source values -> the storage grid ``(x - zero) / step`` of a raw-unit float source; others are unchanged."""
    grid = _raw_grid(calib)
    return x_source if grid is None else (np.asarray(x_source, dtype=np.float64) - grid[0]) / grid[1]


def to_source_units(stored: np.ndarray, calib: dict) -> np.ndarray:
    """Stored values -> the source's own units: float32 ``zero + step * stored`` for a raw-unit float source, else
    unchanged (integer sources are stored as they are)."""
    grid = _raw_grid(calib)
    return stored if grid is None else (grid[0] + grid[1] * np.asarray(stored, dtype=np.float64)).astype(np.float32)


def source_dtype(calib: dict) -> np.dtype:
    """dtype of :func:`to_source_units` results: float32 for a raw-unit float source, else uint16."""
    return np.dtype(np.float32) if _raw_grid(calib) else np.dtype(np.uint16)


def calibration_problem(calib: Any, kind: str) -> str | None:
    """What a source calibration lacks for normalization ``kind`` (the expected form), or None when complete."""
    if not isinstance(calib, dict):
        return f"expected a calibration object, got {type(calib).__name__}"
    if kind == "raw":
        raw = calib.get("raw")
        if not (isinstance(raw, dict) and all(isinstance(raw.get(k), (int, float)) for k in ("center", "scale", "zero", "step"))
                and raw["scale"] > 0 and raw["step"] > 0):
            return (f"'raw' = {raw!r}: expected {{'center', 'scale' > 0, 'zero', 'step' > 0}} for raw-unit normalization "
                    "(source.calibration=none)")
        return None
    if not (isinstance(calib.get("gain"), (int, float)) and calib["gain"] > 0 and isinstance(calib.get("offset"), (int, float))):
        return (f"gain {calib.get('gain')!r}, offset {calib.get('offset')!r}: expected numeric 'gain' > 0 ADU per photon "
                f"and 'offset' for {kind} normalization")
    return None


def _check_norm(calib: dict, norm: dict) -> None:
    if norm.get("kind") not in NORMALIZATION_KINDS:
        raise DataError(f"normalization kind {norm.get('kind')!r}: expected one of {list(NORMALIZATION_KINDS)}")
    problem = calibration_problem(calib, norm["kind"])
    if problem:
        raise DataError(f"calibration {calib}: {problem}")
    if norm.get("center") is None or not norm.get("scale"):
        raise DataError(f"normalization {norm}: expected numeric 'center' and a non-zero 'scale'")
