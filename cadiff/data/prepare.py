"""prepare_data: read source movies, calibrate noise, tile clips, split by recording, write shards + index.

Everything streams: a movie is read in clip-length frame chunks (``read_frames``), calibration reads short
windows, and at most one shard's clips are in memory, so a 2000x512x512 memmapped movie converts with a
small, bounded RSS (``benchmarks/prepare_rss.py``).

Splits are by recording, never by clip: ``round(val_fraction * recordings)`` recordings (at least one when
there are two or more and ``val_fraction > 0``) go to ``val``, chosen by a seeded permutation. A single
recording is split in time instead: its last ``val_fraction`` of frames (at least one clip length) is the
validation block, the frames before it the training block, so no clip straddles the boundary. Calcium
decays (~1 s) still correlate the few frames on either side of the boundary; that leakage is accepted.

Clips of recordings with ROIs (simulator ground truth, Neurofinder regions, NWB segmentations) carry the union of
the ROI masks, cropped like the clip, in their ``meta.json`` (``roi_mask``, :mod:`cadiff.data.conditioning`): the
spatial condition of stage 2.

Never lose a user's data (issue 16). ``out`` only ever holds a complete preparation: the data is built in
the sibling ``.<out>.building/<out>`` (held with :func:`cadiff.io.folder_lock`) and swapped in when complete
(:func:`cadiff.io.commit_dir`), so the earlier data survives any failure. Re-running with the same settings and
input files returns at once (``.prepare_state.json`` fingerprint; data prepared before ``source.calibration``
existed matches the values that repeat it, :func:`reusable_index`); a build left by a killed run (SIGKILL, power
loss) is resumed, its finished shards skipped. Other settings or changed input files over a complete
preparation are refused (naming what changed) unless ``overwrite=true``; a non-empty ``out`` that prepare_data
did not write is refused. Any failure - bad input, MemoryError, OSError such as a full disk, Ctrl-C - removes
the partial build. Before any pixel is read, a pre-flight estimate from shapes and dtypes refuses a
preparation that cannot fit the free disk space or whose single chunk cannot fit the available memory.
While converting to the storage dtype, more than 0.1% clipped values in a recording, or a recording without
any variance, is a DataError: such movies are not detector ADU (a float movie in raw units,
``source.calibration=none``, is converted on its own storage grid, which its range fits).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cadiff import storage
from cadiff.config import leaves
from cadiff.data.conditioning import MASK_KEY, encode_mask, roi_map
from cadiff.data.movie import UINT16_MAX, Movie, normalize, read_frames, to_stored_units
from cadiff.data.noise import (
    POOR_FIT_R2,
    PhotonTransfer,
    RawScale,
    estimate_dark_calibration,
    estimate_photon_transfer,
    estimate_raw_scale,
)
from cadiff.data.shards import INDEX_NAME, read_index, write_index, write_shards
from cadiff.data.simulate import simulate_movie
from cadiff.data.sources.download import GIB
from cadiff.data.sources.hdf5 import HDF5_SUFFIXES, read_hdf5
from cadiff.data.sources.tiff import read_tiff
from cadiff.errors import ConfigError, DataError, NoPhotonSignature
from cadiff.io import OUTPUT_MARKER, check_output_dir, commit_dir, folder_lock, write_json_atomic
from cadiff.runinfo import record_run

log = logging.getLogger(__name__)

JOB = "prepare_data"
STATE_NAME = ".prepare_state.json"
SHARD_PREFIX = "clips"
# the settings that shape the prepared data (out, overwrite and verbose do not)
FINGERPRINT_KEYS = ("source", "clip", "normalization", "val_fraction", "clips_per_shard", "seed")
# data prepared before source.calibration existed (its state has no such key) was calibrated by photon transfer,
# which these values repeat (auto: where that fit is good, see _legacy_difference), so it still matches them
LEGACY_CALIBRATION, LEGACY_ALIKE_CALIBRATIONS = "photon_transfer", ("auto", "photon_transfer")
# raw detector ADU fit the storage dtype; more clipping than this means another unit (processed data, a wrong
# sign or scale), and training on the clipped values would learn the clipping (issue 16)
MAX_CLIPPED_FRACTION = 1e-3
# pre-flight estimate (sizes in bytes)
TAR_BLOCK = 512
NPY_HEADER_BYTES = 128  # np.save's header for a plain [T, H, W] integer array
META_JSON_BYTES = 256  # a clip's meta.json without its ROI map: source and recording ids, t0/y0/x0, split
# photon transfer (estimate_photon_transfer's defaults): 8-frame windows, at most 2M pixel-window samples; measured
# with tracemalloc (32^2 to 1024^2 frames): up to ~40 B per window pixel (float64 copies, filters, sampling) and up to
# ~96 B per kept sample (the fit's arrays)
PT_WINDOW_FRAMES, PT_BYTES_PER_WINDOW_PIXEL, PT_MAX_SAMPLES, PT_BYTES_PER_SAMPLE = 8, 40, 2_000_000, 96
# raw-unit scales (estimate_raw_scale's defaults: at most 2M sampled values and as many frame differences); measured
# with tracemalloc (48^2 to 256^2 frames): 41-50 B per sampled value (float64 samples, differences, deviations)
RAW_MAX_VALUES, RAW_BYTES_PER_VALUE = 2_000_000, 52
# index.json, config.yaml, run.json and the state record: a fixed part, each source's calibration, each shard's entry
METADATA_BYTES, METADATA_PER_RECORDING, METADATA_PER_SHARD = 16 * 1024, 4 * 1024, 64


@dataclass
class Recording:
    """One recording: a stable id, a description (path), a lazy opener and, where known without opening it
    (the simulator), its shape and dtype."""

    rec_id: str
    where: str
    open: Callable[[], Movie]
    shape: tuple[int, int, int] | None = None
    dtype: str | None = None
    in_memory: bool = False  # opening it builds the whole movie in memory (the simulator)


def _safe_id(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "_-" else "-" for c in text).strip("-")
    return out or "recording"


def _expand(path_text: str, what: str) -> list[Path]:
    if any(c in path_text for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(path_text))
        if not matches:
            raise DataError(f"source.path {path_text!r}: the pattern matches no {what}")
        return matches
    path = Path(path_text)
    if not path.exists():
        raise DataError(f"source.path {path}: no such file or folder (expected a {what})")
    return [path]


def _files(path_text: str, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Files named by ``source.path``: a file, a glob, or the files with ``suffixes`` in a folder."""
    paths = []
    for p in _expand(path_text, f"{what} file or folder"):
        found = sorted(q for q in p.iterdir() if q.suffix.lower() in suffixes) if p.is_dir() else [p]
        if not found:
            raise DataError(f"{p}: no {'/'.join(suffixes)} files in the folder")
        paths += found
    return paths


def list_recordings(src: Any) -> list[Recording]:
    """Recordings named by the ``source`` config (files are opened lazily, archives are downloaded here)."""
    name = src.name
    if name == "sim":
        def sim(i: int) -> Callable[[], Movie]:
            return lambda: simulate_movie(preset=src.preset, frames=src.frames, height=src.height, width=src.width,
                                          num_neurons=src.num_neurons, seed=src.seed + i, rate_hz=src.rate_hz,
                                          return_clean=False)[0]

        return [Recording(f"sim-{i:03d}", f"simulator preset={src.preset} seed={src.seed + i}", sim(i),
                          (src.frames, src.height, src.width), "uint16", in_memory=True)
                for i in range(src.num_movies)]
    if name == "tiff":
        paths = _expand(src.path, "TIFF file or folder")
        return [Recording(_safe_id(p.stem), str(p), (lambda p=p: read_tiff(p, rate_hz=src.rate_hz))) for p in paths]
    if name == "hdf5":
        paths = _files(src.path, HDF5_SUFFIXES, "HDF5")
        return [Recording(_safe_id(p.stem), f"{p}:{src.key}", (lambda p=p: read_hdf5(p, src.key, rate_hz=src.rate_hz)))
                for p in paths]
    if name == "nwb":
        from cadiff.data.sources import nwb

        where = [src.path] if nwb.is_url(src.path) else _files(src.path, nwb.NWB_SUFFIXES, "NWB")
        return [Recording(_safe_id(nwb.location_name(p)), str(p),
                          (lambda p=p: nwb.read_nwb(p, series=src.series, rate_hz=src.rate_hz))) for p in where]
    if name == "neurofinder":
        from cadiff.data.sources import neurofinder

        ids = neurofinder.check_ids(list(src.ids))
        folders = neurofinder.download(ids, src.cache_dir, src.base_url,
                                       zip_max_total_bytes=int(src.zip_max_total_gib * GIB),
                                       zip_max_ratio=src.zip_max_ratio)
        return [Recording(_safe_id(f"neurofinder-{i}"), str(f), (lambda f=f: neurofinder.read_neurofinder(f, src.rate_hz)))
                for i, f in zip(ids, folders)]
    if name == "allen":
        from cadiff.data.sources import allen

        ids = allen.check_ids(list(src.ids))
        files = allen.download(ids, src.cache_dir, src.base_url)
        return [Recording(_safe_id(f"allen-{i}"), str(f), (lambda f=f: allen.read_allen(f, src.key, src.rate_hz)))
                for i, f in zip(ids, files)]
    raise DataError(f"source.name {name!r}: expected sim, tiff, hdf5, nwb, neurofinder or allen")


# ---------------------------------------------------------------------------------------------------------
# calibration, tiling, dtype


# the overrides that settle any calibration failure, named by every error that remains
CALIBRATION_FIX = ("pass source.gain and source.offset (raw detector data), or source.calibration=none to "
                   "normalize in the movie's own units")
# float movies in raw units: storage levels per robust std (quantization error ~0.005 std)
RAW_LEVELS_PER_STD = 64


def calibrate(movie: Movie, src: Any, where: str) -> dict[str, Any]:
    """Per-recording calibration by ``source.calibration``; given ``source.gain/offset`` win over estimates."""
    entry: dict[str, Any] = {"rate_hz": float(movie.rate_hz)}
    if movie.pixel_size_um is not None:  # carried to the TIFFs sample.py writes
        entry["pixel_size_um"] = float(movie.pixel_size_um)
    if src.calibration == "none":
        entry.update(raw_calibration(movie, src, where))
    elif src.gain is not None and src.offset is not None:
        entry.update(gain=float(src.gain), offset=float(src.offset), read_noise=float(src.read_noise or 0.0),
                     calibration="given")
    elif src.calibration == "auto":
        entry.update(_auto_calibration(movie, src, where))
    else:
        entry.update(ESTIMATORS[src.calibration](movie, src, where, None))
    for key in ("gain", "offset", "read_noise"):
        value = getattr(movie, key)
        if value is not None:
            entry[f"true_{key}"] = float(value)  # the simulator's ground truth, for comparison
    if entry["gain"] is not None and entry["gain"] <= 0:
        raise DataError(f"{where}: gain {entry['gain']} ADU/photon, expected > 0")
    return entry


def _with_given(pt: PhotonTransfer, src: Any, method: str) -> dict[str, Any]:
    """An estimated line, with a given ``source.gain`` or ``source.offset`` taking its part."""
    gain = float(src.gain if src.gain is not None else pt.gain)
    if src.offset is not None:
        # a true (dark) offset above the PT intercept carries read noise: var = g (offset - intercept)
        offset, read_noise = float(src.offset), math.sqrt(max(0.0, gain * (src.offset - pt.offset)))
    else:
        # the intercept as offset with zero read noise reproduces the fitted mean-variance line exactly
        offset, read_noise = float(pt.offset), 0.0
    return {"gain": gain, "offset": offset, "read_noise": read_noise, "calibration": method,
            "photon_transfer": pt.as_dict()}


def _failed(where: str, what: str, exc: DataError) -> DataError:
    """The error of a failed estimate, of the same class; a missing photon signature names the overrides."""
    fix = f"; {CALIBRATION_FIX}" if isinstance(exc, NoPhotonSignature) else ""
    return type(exc)(f"{where}: {what} failed: {exc}{fix}")


def _photon_transfer(movie: Movie, src: Any, where: str, min_r2: float | None) -> dict[str, Any]:
    """Photon transfer; a fit below ``min_r2`` is a NoPhotonSignature (``None``: a warning)."""
    try:
        pt = estimate_photon_transfer(movie.data, max_frames=src.calibration_frames)
    except DataError as exc:
        raise _failed(where, "noise calibration", exc) from exc
    if pt.r2 < POOR_FIT_R2:
        if min_r2 is not None:
            reason = NoPhotonSignature(f"photon-transfer fit is poor (R^2 {pt.r2:.2f} < {min_r2})")
            raise NoPhotonSignature(f"{where}: noise calibration failed: {reason}; {CALIBRATION_FIX}") from reason
        log.warning("%s: photon-transfer fit is poor (r2 %.2f); consider source.gain/source.offset or "
                    "source.calibration=none", where, pt.r2)
    return _with_given(pt, src, "photon_transfer")


def _dark(movie: Movie, src: Any, where: str, min_r2: float | None) -> dict[str, Any]:
    """Offset from the darkest pixels (or ``source.offset``), gain from the photon-transfer slope through it; the
    fit must reach ``min_r2`` (``None``: :data:`POOR_FIT_R2`)."""
    try:
        pt = estimate_dark_calibration(movie.data, offset=src.offset, max_frames=src.calibration_frames,
                                       min_r2=POOR_FIT_R2 if min_r2 is None else min_r2)
    except DataError as exc:
        raise _failed(where, "dark-offset calibration", exc) from exc
    return _with_given(pt, src, "dark")


ESTIMATORS: dict[str, Callable[[Movie, Any, str, float | None], dict[str, Any]]] = {
    "photon_transfer": _photon_transfer,
    "dark": _dark,
}


def _auto_calibration(movie: Movie, src: Any, where: str) -> dict[str, Any]:
    """Photon transfer, else the dark-pixel offset, else raw units; a fallback is one WARNING line saying why.

    Only a missing photon signature falls back: bad input (NaN, unreadable frames) fails as with any method.
    """
    failures = []
    for method, estimate in ESTIMATORS.items():
        try:
            entry = estimate(movie, src, where, POOR_FIT_R2)
        except NoPhotonSignature as exc:
            failures.append(f"{method}: {exc.__cause__ or exc}")
            continue
        if failures:
            log.warning("%s: source.calibration=auto used %s (%s)", where, method, "; ".join(failures))
        return entry
    log.warning("%s: source.calibration=auto found no photon signature (%s): normalized in raw units as with "
                "source.calibration=none, gain-based metrics are not applicable; pass source.gain and "
                "source.offset if this is raw detector data", where, "; ".join(failures))
    return raw_calibration(movie, src, where)


def raw_calibration(movie: Movie, src: Any, where: str) -> dict[str, Any]:
    """No photon scale: the robust level/scale/noise of the movie in its own units and its storage grid."""
    try:
        stats = estimate_raw_scale(movie.data, max_frames=src.calibration_frames)
    except DataError as exc:
        raise _failed(where, "raw-unit normalization", exc) from exc
    zero, step = raw_storage_grid(stats, np.issubdtype(movie.dtype, np.floating))
    return {"gain": None, "offset": None, "read_noise": None, "calibration": "none",
            "raw": {**stats.as_dict(), "zero": zero, "step": step}}


def raw_storage_grid(stats: RawScale, is_float: bool) -> tuple[float, float]:
    """``(zero, step)``: the source value stored as 0 and source units per stored integer (calibration none).

    Integer movies keep their values (0, 1). A float movie gets ``RAW_LEVELS_PER_STD`` levels per robust std, or
    coarser where its sampled range needs it to fill at most a quarter of uint16, centred in the range.
    """
    if not is_float:
        return 0.0, 1.0
    step = max(stats.scale / RAW_LEVELS_PER_STD, (stats.high - stats.low) / (UINT16_MAX / 4))
    return (stats.low + stats.high) / 2 - step * UINT16_MAX / 2, step


def describe_calibration(calib: dict[str, Any]) -> str:
    """One line for the log: the photon calibration, or the raw-unit scales of calibration none."""
    if calib["calibration"] == "none":
        raw = calib["raw"]
        return f"raw units (calibration none): median {raw['center']:.6g}, robust std {raw['scale']:.4g}"
    return f"gain {calib['gain']:.4g} ADU/photon, offset {calib['offset']:.2f} ADU ({calib['calibration']})"


def _settle_raw_units(recordings: list[Recording], sources: dict[str, dict], src: Any) -> None:
    """One normalization for the data set: when auto left some recordings in raw units, all of them are."""
    raw = sorted(k for k, v in sources.items() if v["calibration"] == "none")
    if not raw or len(raw) == len(sources):
        return
    log.warning("source.calibration=auto: %s have no photon signature, so every recording is normalized in raw units "
                "(one normalization per data set); pass source.calibration=none to say so, or prepare those "
                "recordings separately", raw)
    for rec in recordings:
        entry = sources[rec.rec_id]
        if entry["calibration"] != "none":
            entry.pop("photon_transfer", None)
            entry.update(raw_calibration(rec.open(), src, rec.where))


def storage_dtype(dtypes: list[np.dtype]) -> np.dtype:
    """int16 when every recording is int16 (kept exact), else uint16."""
    return np.dtype(np.int16) if all(d == np.int16 for d in dtypes) else np.dtype(np.uint16)


def to_storage(chunk: np.ndarray, dtype: np.dtype, where: str, t0: int) -> tuple[np.ndarray, int]:
    """Convert frames to the integer storage dtype -> ``(frames, number of values clipped to its range)``;
    NaN/Inf, or integers out of range that are not int16 (whose negative values clip to 0), are DataErrors."""
    if chunk.dtype == dtype:
        return chunk, 0
    info = np.iinfo(dtype)
    if np.issubdtype(chunk.dtype, np.floating):
        if not np.isfinite(chunk).all():
            bad = int(np.argwhere(~np.isfinite(chunk))[0][0]) + t0
            raise DataError(f"{where}: frame {bad} contains NaN/Inf; expected finite intensities")
        rounded = np.rint(chunk)
        clipped = int(((rounded < info.min) | (rounded > info.max)).sum())
        return np.clip(rounded, info.min, info.max).astype(dtype), clipped
    lo, hi = chunk.min(), chunk.max()
    if lo < info.min or hi > info.max:
        if dtype == np.uint16 and chunk.dtype == np.int16:
            return np.clip(chunk, 0, UINT16_MAX).astype(dtype), int((chunk < 0).sum())
        raise DataError(f"{where}: values {lo}..{hi} do not fit {dtype}; expected detector ADU")
    return chunk.astype(dtype), 0


class StorageCheck:
    """One recording's values as stored: more than :data:`MAX_CLIPPED_FRACTION` of them clipped, or no variance
    at all, is a DataError (the movie is not detector ADU)."""

    def __init__(self, where: str, dtype: np.dtype, total_values: int) -> None:
        self.where, self.dtype, self.total_values = where, np.dtype(dtype), total_values
        self.seen = self.clipped = 0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, stored: np.ndarray, clipped: int) -> None:
        self.seen += stored.size
        self.clipped += clipped
        self.lo, self.hi = min(self.lo, int(stored.min())), max(self.hi, int(stored.max()))
        if self.clipped > MAX_CLIPPED_FRACTION * self.total_values:  # the rest of the movie cannot undo it
            info = np.iinfo(self.dtype)
            raise DataError(
                f"{self.where}: {self.clipped / self.seen:.2%} of the values read so far ({self.clipped} of {self.seen})"
                f" lie outside the {self.dtype} range {info.min}..{info.max} and would be clipped (at most "
                f"{MAX_CLIPPED_FRACTION:.1%} of a recording may be); expected raw detector ADU: prepare the raw movie, "
                "or convert processed data (dF/F, background-subtracted) to ADU first - source.gain/source.offset "
                "describe ADU, they do not rescale the values; a float movie of processed data can also be kept in "
                "its own units with source.calibration=none")

    def finish(self) -> None:
        if self.seen and self.lo == self.hi:
            raise DataError(f"{self.where}: every value is {self.lo} (zero variance); expected a movie with signal and "
                            "noise (check source.path / source.key: an empty or blank dataset?)")
        if self.clipped:
            log.warning("%s: %d values (%.3f%%) outside the %s range were clipped", self.where, self.clipped,
                        100 * self.clipped / self.seen, self.dtype)


def clip_grid(height: int, width: int, clip: Any, t_range: tuple[int, int]) -> tuple[range, range, range]:
    """Start frames, rows and columns of the clips inside frames ``t_range`` on the stride grid: every
    combination is one clip."""
    st = clip.stride_frames or clip.frames
    sp_y = clip.stride_px or clip.height
    sp_x = clip.stride_px or clip.width
    return (range(t_range[0], t_range[1] - clip.frames + 1, st), range(0, height - clip.height + 1, sp_y),
            range(0, width - clip.width + 1, sp_x))


def iter_clips(movie: Movie, rec_id: str, clip: Any, t_range: tuple[int, int], dtype: np.dtype,
               split: str, check: StorageCheck, calib: dict) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Stream clips of one recording: one clip-length chunk of frames in memory at a time, in the storage units of
    its calibration ``calib`` (a raw-unit float movie on its grid, :func:`cadiff.data.movie.to_stored_units`)."""
    _, height, width = movie.shape
    starts, rows, cols = clip_grid(height, width, clip, t_range)
    rois = roi_map(movie.rois)
    for t0 in starts:
        frames = to_stored_units(read_frames(movie.data, t0, t0 + clip.frames), calib)
        chunk, clipped = to_storage(frames, dtype, check.where, t0)
        check.add(chunk, clipped)
        for y0 in rows:
            for x0 in cols:
                tile = np.ascontiguousarray(chunk[:, y0: y0 + clip.height, x0: x0 + clip.width])
                meta = {"source": rec_id, "recording": rec_id, "t0": t0, "y0": y0, "x0": x0, "split": split}
                if rois is not None:  # stage-2 ROI conditioning: the movie's ROI map, cropped like the clip
                    meta[MASK_KEY] = encode_mask(rois[y0: y0 + clip.height, x0: x0 + clip.width])
                yield f"{rec_id}_t{t0:06d}_y{y0:04d}_x{x0:04d}", tile, meta


class RunningMoments:
    """Streaming mean/std (float64 sums) of normalized-domain values."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        v = values.astype(np.float64, copy=False)
        self.n += v.size
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())

    def mean_std(self) -> tuple[float, float]:
        mean = self.total / max(self.n, 1)
        return mean, math.sqrt(max(self.total_sq / max(self.n, 1) - mean * mean, 0.0))


# ---------------------------------------------------------------------------------------------------------
# what the data is made from, and what an earlier preparation in `out` was made from


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Provenance:
    """What a preparation is made from: the settings that shape it and each recording's files."""

    settings: dict[str, Any]
    files: dict[str, list | None]  # where -> [(path, size, mtime_ns)]; None for a recording without files

    @property
    def fingerprint(self) -> str:
        return _digest({"config": self.settings, "files": [f for f in self.files.values() if f is not None]})

    @property
    def legacy_fingerprint(self) -> str | None:
        """The fingerprint these settings had before ``source.calibration`` existed, where its value prepares that
        data the same way (:data:`LEGACY_ALIKE_CALIBRATIONS`); None otherwise."""
        source = self.settings.get("source")
        if not isinstance(source, dict) or source.get("calibration") not in LEGACY_ALIKE_CALIBRATIONS:
            return None
        before = {**self.settings, "source": {k: v for k, v in source.items() if k != "calibration"}}
        return Provenance(before, self.files).fingerprint

    def state(self, complete: bool) -> dict[str, Any]:
        """The ``.prepare_state.json`` record: fingerprint, and what it is made of (to say what changed)."""
        inputs = {where: None if f is None else _digest(f) for where, f in self.files.items()}
        return {"fingerprint": self.fingerprint, "complete": complete, "settings": self.settings, "inputs": inputs}


def provenance(cfg: Any, recordings: list[Recording]) -> Provenance:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    files: dict[str, list | None] = {}
    for rec in recordings:
        path = Path(rec.where.split(":")[0])
        members = (sorted(path.rglob("*")) if path.is_dir() else [path]) if path.exists() else None
        files[rec.where] = None if members is None else [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                                         for p in members if p.is_file()]
    return Provenance({k: plain.get(k) for k in FINGERPRINT_KEYS}, files)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def what_changed(state: dict[str, Any], now: Provenance) -> str:
    """The differences between an earlier preparation's state record and ``now``, in words."""
    if "settings" not in state:
        return "its settings or input files differ (that run recorded no details)"
    old, new = leaves(state["settings"]), leaves(now.settings)
    if "source.name" in old and "source.calibration" not in old:  # prepared before the option existed
        calibration = new.get("source.calibration")
        old["source.calibration"] = calibration if calibration in LEGACY_ALIKE_CALIBRATIONS else LEGACY_CALIBRATION
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    before, after = state.get("inputs", {}), now.state(complete=True)["inputs"]
    for label, names in (("changed input files", [w for w in after if w in before and before[w] != after[w]]),
                         ("new inputs", [w for w in after if w not in before]),
                         ("inputs no longer given", [w for w in before if w not in after])):
        if names:
            parts.append(f"{label}: {_listed(names)}")
    return "; ".join(parts) or "its fingerprint differs"


def _legacy_difference(index: dict[str, Any], now: Provenance) -> str | None:
    """How data prepared before ``source.calibration`` existed differs from what ``now`` prepares (None: it does
    not): source.calibration=auto no longer keeps a poor photon-transfer fit (R^2 < :data:`POOR_FIT_R2`)."""
    if now.settings["source"].get("calibration") != "auto":
        return None
    poor = [k for k, v in index["sources"].items() if v.get("calibration") == "photon_transfer"
            and (v.get("photon_transfer") or {}).get("r2", POOR_FIT_R2) < POOR_FIT_R2]
    if not poor:
        return None
    return (f"it was prepared before source.calibration existed, by photon transfer, and the fit is poor (R^2 < "
            f"{POOR_FIT_R2}) for {_listed(poor)}, where source.calibration=auto now uses a dark offset or raw units; "
            "pass source.calibration=photon_transfer to keep that data")


def reusable_index(out: Path, state: dict[str, Any], now: Provenance, overwrite: bool) -> dict[str, Any] | None:
    """The index of the complete preparation in ``out`` when it is made from ``now``'s settings and inputs (also
    one prepared before source.calibration existed that they repeat); None when it is to be rebuilt (``overwrite``,
    or an unusable index). Other settings or inputs without ``overwrite`` are a ConfigError."""
    fingerprint, difference = state.get("fingerprint"), None
    if fingerprint is not None and fingerprint in (now.fingerprint, now.legacy_fingerprint):
        try:
            index = read_index(out)
        except DataError as exc:
            log.warning("existing index unusable (%s): preparing again", exc)
            return None
        difference = None if fingerprint == now.fingerprint else _legacy_difference(index, now)
        if difference is None:
            log.info("%s is already prepared with these settings and inputs; nothing to do", out)
            return index
    if overwrite:
        return None
    raise ConfigError(f"out '{out}' holds data prepared from other settings or inputs "
                      f"({difference or what_changed(state, now)}); pass overwrite=true to rebuild it (the old data "
                      "stays until the new data is complete), or choose another out (nothing was changed)")


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}


def earlier_output(out: Path) -> dict[str, Any]:
    """The state record of an earlier prepare_data output in ``out`` (``{}`` for a missing or empty folder);
    a file, a link or a non-empty folder that prepare_data did not write is refused untouched (ConfigError)."""
    if out.is_symlink() or not (out / STATE_NAME).is_file():  # a state without a marker: written before markers
        check_output_dir(out, JOB, overwrite=True)
    return _read_state(out)


# ---------------------------------------------------------------------------------------------------------
# layout and pre-flight estimate: from shapes and dtypes alone, before any pixel is read


@dataclass
class Layout:
    """Which frames of which recording become clips of which split."""

    shapes: dict[str, tuple[int, int, int]]
    dtypes: dict[str, np.dtype]
    ranges: dict[str, dict[str, tuple[int, int]]]  # split -> recording -> frames [t0, t1)
    split_by: str
    val_ids: set[str]

    @property
    def storage(self) -> np.dtype:
        return storage_dtype(list(self.dtypes.values()))

    def values_read(self, rec_id: str, clip: Any) -> int:
        """Values of ``rec_id`` converted to the storage dtype: its clip-length chunks, whole frames."""
        _, height, width = self.shapes[rec_id]
        chunks = sum(len(clip_grid(height, width, clip, r[rec_id])[0]) for r in self.ranges.values() if rec_id in r)
        return chunks * clip.frames * height * width


def probe(rec: Recording) -> tuple[tuple[int, int, int], np.dtype]:
    """Shape and dtype of a recording, from its header (file readers are lazy) or known beforehand."""
    if rec.shape is not None and rec.dtype is not None:
        return rec.shape, np.dtype(rec.dtype)
    movie = rec.open()
    return movie.shape, movie.dtype


def plan(cfg: Any, recordings: list[Recording], step: Step) -> Layout:
    """Check every recording's shape against the clip and split the recordings (or one recording's time)."""
    clip = cfg.clip
    shapes, dtypes = {}, {}
    for rec in recordings:
        step.now = f"opening {rec.where}"
        shape, dtype = probe(rec)
        t, h, w = shape
        if t < clip.frames or h < clip.height or w < clip.width:
            raise DataError(f"{rec.where}: movie {shape} is smaller than one clip "
                            f"{clip.frames}x{clip.height}x{clip.width}; expected at least that many frames/pixels")
        shapes[rec.rec_id], dtypes[rec.rec_id] = shape, dtype
    val_ids = _split_recordings(recordings, cfg.val_fraction, cfg.seed)
    ranges: dict[str, dict[str, tuple[int, int]]] = {"train": {}, "val": {}}
    split_by = "recording"
    for rec in recordings:
        n = shapes[rec.rec_id][0]
        if len(recordings) == 1 and cfg.val_fraction > 0:
            split_by = "time"
            val_frames = max(clip.frames, int(round(cfg.val_fraction * n)))
            if n - val_frames >= clip.frames:
                ranges["train"][rec.rec_id], ranges["val"][rec.rec_id] = (0, n - val_frames), (n - val_frames, n)
            else:
                log.warning("%s: %d frames are too few for a time split with %d-frame clips; no val split",
                            rec.where, n, clip.frames)
                ranges["train"][rec.rec_id] = (0, n)
        else:
            ranges["val" if rec.rec_id in val_ids else "train"][rec.rec_id] = (0, n)
    return Layout(shapes, dtypes, ranges, split_by, val_ids)


@dataclass
class Estimate:
    """Pre-flight size of a preparation, from shapes and dtypes alone."""

    clips: dict[str, dict[str, int]]  # split -> recording -> clips
    disk_bytes: int
    memory_bytes: dict[str, int]  # peak working memory while reading each recording

    def clips_of(self, rec_id: str) -> int:
        return sum(per.get(rec_id, 0) for per in self.clips.values())

    def as_dict(self) -> dict[str, int]:
        total = sum(n for per in self.clips.values() for n in per.values())
        return {"clips": total, "disk_bytes": self.disk_bytes, "peak_memory_bytes": max(self.memory_bytes.values())}


def mask_record_bytes(height: int, width: int) -> int:
    """Upper bound of the JSON ``roi_mask`` record of an ``height x width`` clip (base64 of its packed bits)."""
    packed = math.ceil(height * width / 8)
    return 48 + 4 * math.ceil(packed / 3)


def _tar_bytes(payload: int) -> int:
    """A tar member: its header block and the payload padded to whole blocks."""
    return TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK


def _shards_bytes(num_clips: int, clips_per_shard: int, sample_bytes: int) -> int:
    """Shards of ``num_clips`` samples: each ends with two zero blocks and is padded to tarfile's record size."""
    def shard(n: int) -> int:
        return -(-(n * sample_bytes + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE if n else 0

    full, rest = divmod(num_clips, clips_per_shard)
    return full * shard(clips_per_shard) + shard(rest)


def peak_memory(shape: tuple[int, int, int], dtype: np.dtype, storage: np.dtype, clip: Any, clips_per_shard: int,
                in_memory: bool, raw_units: bool) -> int:
    """Working memory while one recording is read: the larger of its calibration (photon transfer, or the raw-unit
    scales where ``raw_units`` may be the outcome) and a tiling chunk."""
    t, h, w = shape
    # a chunk as read, its rounded and clipped float copies and masks, the storage copy; one shard's clips twice
    # (arrays and their npy bytes). A float movie in raw units is first put on its storage grid (to_stored_units):
    # then those copies are float64.
    on_grid = raw_units and np.issubdtype(dtype, np.floating)
    per_value = dtype.itemsize + 3 * 8 if on_grid else 3 * dtype.itemsize
    tiling = (clip.frames * h * w * (per_value + 4 + storage.itemsize)
              + 2 * clips_per_shard * clip.frames * clip.height * clip.width * storage.itemsize)
    calibration = (PT_WINDOW_FRAMES * h * w * PT_BYTES_PER_WINDOW_PIXEL
                   + min(PT_MAX_SAMPLES, t // PT_WINDOW_FRAMES * h * w) * PT_BYTES_PER_SAMPLE)
    if raw_units:
        calibration = max(calibration, min(RAW_MAX_VALUES, t * h * w) * RAW_BYTES_PER_VALUE)
    return max(tiling, calibration) + (t * h * w * dtype.itemsize if in_memory else 0)


def may_end_in_raw_units(src: Any) -> bool:
    """Whether ``source.calibration`` can leave recordings in raw units: ``none``, or ``auto`` without a given
    ``source.gain`` and ``source.offset`` (a movie without a photon signature falls back to them)."""
    given = src.gain is not None and src.offset is not None
    return src.calibration == "none" or (src.calibration == "auto" and not given)


def estimate_size(layout: Layout, recordings: list[Recording], clip: Any, clips_per_shard: int,
                  raw_units: bool) -> Estimate:
    """Clips per split and recording, bytes of the written folder, and working memory per recording (``raw_units``:
    the calibration may end in raw units, :func:`may_end_in_raw_units`)."""
    storage = layout.storage
    # a sample: the clip's npy member and its meta.json member (with an ROI map where the source has ROIs)
    sample = (_tar_bytes(NPY_HEADER_BYTES + clip.frames * clip.height * clip.width * storage.itemsize)
              + _tar_bytes(META_JSON_BYTES + mask_record_bytes(clip.height, clip.width)))
    clips: dict[str, dict[str, int]] = {}
    for split, per_rec in layout.ranges.items():
        clips[split] = {rec_id: math.prod(len(r) for r in clip_grid(*layout.shapes[rec_id][1:], clip, t_range))
                        for rec_id, t_range in per_rec.items()}
    per_split = [sum(per.values()) for per in clips.values()]
    disk = (sum(_shards_bytes(n, clips_per_shard, sample) for n in per_split) + METADATA_BYTES
            + METADATA_PER_RECORDING * len(recordings) + METADATA_PER_SHARD * sum(-(-n // clips_per_shard) for n in per_split))
    memory = {rec.rec_id: peak_memory(layout.shapes[rec.rec_id], layout.dtypes[rec.rec_id], storage, clip,
                                      clips_per_shard, rec.in_memory, raw_units) for rec in recordings}
    return Estimate(clips, disk, memory)


def available_memory_bytes() -> int | None:
    """Memory this process may still allocate: MemAvailable, capped by its cgroup v2 limit; None when unknown."""
    found = []
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        found += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        group = Path("/proc/self/cgroup").read_text().split("0::", 1)[1].splitlines()[0].strip("/")
        folder = Path("/sys/fs/cgroup") / group
        limit = (folder / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


def format_bytes(num: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    k = 0
    while num >= 1024 and k < len(units) - 1:
        num, k = num / 1024, k + 1
    return f"{num:.3g} {units[k]}" if k else f"{int(num)} B"


def preflight(estimate: Estimate, layout: Layout, recordings: list[Recording], cfg: Any, tree: Path) -> None:
    """Refuse, before any pixel is read, a recording whose working memory exceeds the available memory and a
    preparation larger than the free space beside ``out``; also one that would give no training clips."""
    clip, out = cfg.clip, cfg.out
    available = available_memory_bytes()
    for rec in recordings:
        need = estimate.memory_bytes[rec.rec_id]
        if available is not None and need > available:
            t, h, w = layout.shapes[rec.rec_id]
            raise DataError(f"{rec.where}: a {t}x{h}x{w} {layout.dtypes[rec.rec_id]} movie needs about "
                            f"{format_bytes(need)} of memory to read ({clip.frames} frames of {h}x{w} at a time), but "
                            f"only {format_bytes(available)} are available; expected frames that fit in memory: crop or "
                            "bin the movie, or use a machine with more memory")
    if not sum(estimate.clips["train"].values()):
        raise DataError(f"{out}: no training clips (recordings {[r.where for r in recordings]} with clip "
                        f"{clip.frames}x{clip.height}x{clip.width}); lower val_fraction or the clip size")
    free = shutil.disk_usage(tree.parent).free
    written = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) if tree.exists() else 0  # a resumed build
    need = estimate.disk_bytes - written
    if need > free:
        most = max(recordings, key=lambda r: estimate.clips_of(r.rec_id))
        raise DataError(f"{out}: the prepared data needs about {format_bytes(need)} on disk "
                        f"({estimate.as_dict()['clips']:,} clips of {clip.frames}x{clip.height}x{clip.width} "
                        f"{layout.storage}, {estimate.clips_of(most.rec_id):,} of them from {most.where}), but only "
                        f"{format_bytes(free)} are free there; expected an out with room for it: free space, choose "
                        "another out, or take fewer clips (larger clip.stride_frames/clip.stride_px, fewer recordings)")
    log.info("pre-flight: %s clips, about %s on disk (%s free), peak working memory about %s (%s available)",
             f"{estimate.as_dict()['clips']:,}", format_bytes(need), format_bytes(free),
             format_bytes(estimate.as_dict()["peak_memory_bytes"]),
             "unknown" if available is None else format_bytes(available))


# ---------------------------------------------------------------------------------------------------------
# the job


def _split_recordings(recordings: list[Recording], val_fraction: float, seed: int) -> set[str]:
    n = len(recordings)
    if n < 2 or val_fraction <= 0:
        return set()
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    order = np.random.default_rng(seed).permutation(n)
    return {recordings[i].rec_id for i in order[:n_val]}


def _summary(index: dict, out: Path) -> dict[str, Any]:
    splits = index["splits"]
    return {
        "num_train": splits.get("train", {}).get("num_clips", 0),
        "num_val": splits.get("val", {}).get("num_clips", 0),
        "clip_shape": index["clip_shape"],
        "dtype": index["dtype"],
        "num_recordings": len(index["sources"]),
        "val_recordings": index.get("val_recordings", []),
        "sources": {k: {"calibration": v.get("calibration"), "gain": v["gain"], "offset": v["offset"]}
                    for k, v in index["sources"].items()},
        "normalization": index["normalization"],
        "out": str(out),
    }


@dataclass
class Step:
    """What the build is doing: named in the message of a failure that does not say (MemoryError, OSError)."""

    now: str = "checking the inputs"


def prepare_data(cfg: Any) -> dict[str, Any]:
    """Run the whole preparation for a ``PrepareDataConfig``; returns a summary dict (counts, shapes, paths).
    An object-store ``out`` (``s3://``, ``gs://``) is prepared in a local copy and uploaded (:func:`_prepare_to_store`)."""
    if storage.is_remote(cfg.out):
        return _prepare_to_store(cfg)
    out = storage.local_path(cfg.out)
    recordings = list_recordings(cfg.source)
    if not recordings:
        raise DataError(f"source {cfg.source.name}: no recordings found")
    if len({r.rec_id for r in recordings}) != len(recordings):
        raise DataError(f"source {cfg.source.name}: recording names collide: {[r.where for r in recordings]}")
    made_from = provenance(cfg, recordings)
    where = Path(os.path.abspath(out))
    building = where.parent / f".{where.name}.building"  # stable: a killed build is found and resumed
    with folder_lock(building, f"out '{out}': the build folder"):
        state = earlier_output(out)
        earlier = reusable_index(out, state, made_from, cfg.overwrite) if (out / INDEX_NAME).is_file() else None
        if earlier is not None:
            return _summary(earlier, out)
        index = build(building / where.name, out, cfg, recordings, made_from)
    with contextlib.suppress(OSError):
        building.rmdir()  # left by an earlier killed build, now done with
    return _summary(index, out)


def _prepare_to_store(cfg: Any) -> dict[str, Any]:
    """Prepare an object-store ``out`` in a local copy of it (its earlier output included, so reuse and
    ``overwrite`` behave as for a local folder), then upload it with index.json last and drop the objects the
    new build no longer has. A failure uploads nothing; the local copy is removed on every exit."""
    uri = storage.resolved(cfg.out)
    with storage.mirrored(uri, prefix="cadiff-prepare-") as mirror:
        local = mirror.local / "out"
        local.mkdir()
        for child in list(mirror.local.iterdir()):
            if child != local:
                os.replace(child, local / child.name)
        local_cfg = copy.deepcopy(cfg)
        local_cfg.out = str(local)
        summary = prepare_data(local_cfg)
        sent = storage.upload_dir(local, uri, last=(INDEX_NAME,), delete=True)
    log.info("prepare_data: uploaded %d file(s) to %s", len(sent), uri)
    return {**summary, "out": uri}


def build(tree: Path, out: Path, cfg: Any, recordings: list[Recording], made_from: Provenance) -> dict[str, Any]:
    """Prepare into ``tree`` (resuming a killed build of the same settings and inputs) and swap it in for
    ``out``; any failure removes ``tree`` and leaves ``out`` as it was."""
    if tree.exists() and _read_state(tree).get("fingerprint") != made_from.fingerprint:
        shutil.rmtree(tree)  # a killed build of other settings or inputs
    elif tree.exists():
        log.info("resuming the unfinished build %s: finished shards are kept", tree)
    step = Step()
    try:
        index = _prepare_into(tree, out, cfg, recordings, made_from, step)
        step.now = f"swapping {tree} in for {out}"
        if (out / STATE_NAME).is_file() and not (out / OUTPUT_MARKER).is_file():
            write_json_atomic(out / OUTPUT_MARKER, {"job": JOB})  # written before output markers: ours to replace
        commit_dir(tree, out, JOB, overwrite=True)
        return index
    except (OSError, MemoryError) as exc:
        _discard(tree, out)
        raise DataError(_failure_message(exc, out, step)) from exc
    except BaseException:
        _discard(tree, out)
        raise


def _discard(tree: Path, out: Path) -> None:
    shutil.rmtree(tree, ignore_errors=True)
    log.warning("removed the unfinished build %s; %s is as it was", tree, out)


def _failure_message(exc: OSError | MemoryError, out: Path, step: Step) -> str:
    if isinstance(exc, MemoryError):
        cause, hint = "out of memory", "crop or bin the movie, or use a machine with more memory"
    else:
        cause = (exc.strerror or str(exc)) + (f" ({exc.filename})" if exc.filename else "")
        hint = "free disk space or choose another out" if exc.errno == errno.ENOSPC else "check the path and its permissions"
    kept = "the earlier data there is untouched" if out.exists() else "nothing was kept"
    return f"{out}: {cause} while {step.now}; {hint} (the unfinished build was removed, {kept})"


def _prepare_into(tree: Path, out: Path, cfg: Any, recordings: list[Recording], made_from: Provenance,
                  step: Step) -> dict[str, Any]:
    layout = plan(cfg, recordings, step)
    estimate = estimate_size(layout, recordings, cfg.clip, cfg.clips_per_shard, may_end_in_raw_units(cfg.source))
    preflight(estimate, layout, recordings, cfg, tree)
    # every input is opened and calibrated before any clip is written
    sources = {rec.rec_id: _calibrated(rec, layout, cfg.source, step) for rec in recordings}
    step.now = "settling one normalization for every recording"
    _settle_raw_units(recordings, sources, cfg.source)
    for rec_id, calib in sources.items():
        log.info("%s: %s, %s", rec_id, tuple(calib["shape"]), describe_calibration(calib))
    norm = cfg.normalization
    norm_kind = "raw" if all(c["calibration"] == "none" for c in sources.values()) else norm.kind
    tree.mkdir(parents=True, exist_ok=True)
    write_json_atomic(tree / STATE_NAME, made_from.state(complete=False))
    record_run(tree, cfg, JOB)
    splits, moments = _write_splits(tree, cfg, recordings, layout, sources, norm_kind, step)
    mean, std = moments.mean_std()
    clip = cfg.clip
    index = {
        "kind": "clips",
        "clip_shape": [clip.frames, clip.height, clip.width],
        "clip_stride": [clip.stride_frames or clip.frames, clip.stride_px or clip.height, clip.stride_px or clip.width],
        "dtype": str(layout.storage),
        "splits": splits,
        "split_by": layout.split_by,
        "val_recordings": sorted(layout.val_ids) if layout.split_by == "recording" else [],
        "sources": sources,
        "normalization": {"kind": norm_kind, "center": float(norm.center) if norm.center is not None else mean,
                          "scale": float(norm.scale) if norm.scale is not None else max(std, 1e-6)},
        "source_config": cfg.source.name,
        "fingerprint": made_from.fingerprint,
        "estimate": estimate.as_dict(),
    }
    step.now = f"writing {tree / INDEX_NAME}"
    write_index(tree, index)
    write_json_atomic(tree / STATE_NAME, made_from.state(complete=True))
    return index


def _calibrated(rec: Recording, layout: Layout, src: Any, step: Step) -> dict[str, Any]:
    step.now = f"calibrating {rec.where}"
    calib = calibrate(rec.open(), src, rec.where)
    shape = layout.shapes[rec.rec_id]
    calib.update(recording=rec.rec_id, path=rec.where, shape=list(shape), dtype=str(layout.dtypes[rec.rec_id]))
    return calib


def _write_splits(tree: Path, cfg: Any, recordings: list[Recording], layout: Layout, sources: dict[str, dict],
                  norm_kind: str, step: Step) -> tuple[dict[str, dict], RunningMoments]:
    """Tile every recording into its split's shards; train clips feed the moments of normalization ``norm_kind``."""
    clip, dtype = cfg.clip, layout.storage
    by_id = {r.rec_id: r for r in recordings}
    checks = {r.rec_id: StorageCheck(r.where, dtype, layout.values_read(r.rec_id, clip)) for r in recordings}
    moments = RunningMoments()
    unit_norm = {"kind": norm_kind, "center": 0.0, "scale": 1.0}  # f(photons) or the raw z-score

    def samples(split: str) -> Iterator[tuple[str, np.ndarray, dict]]:
        for rec_id, t_range in layout.ranges[split].items():
            calib = sources[rec_id]
            step.now = f"tiling {by_id[rec_id].where}"
            movie = by_id[rec_id].open()
            for key, tile, meta in iter_clips(movie, rec_id, clip, t_range, dtype, split, checks[rec_id], calib):
                if split == "train":
                    moments.add(normalize(tile, calib, unit_norm))
                yield key, tile, meta

    splits: dict[str, dict] = {}
    for split in ("train", "val"):
        shards = write_shards(samples(split), tree, split, SHARD_PREFIX, cfg.clips_per_shard, kind="clips")
        splits[split] = {"shards": shards, "num_clips": sum(s["count"] for s in shards),
                         "recordings": sorted(layout.ranges[split]),
                         "frame_ranges": {k: list(v) for k, v in layout.ranges[split].items()}}
    for check in checks.values():
        check.finish()
    return splits, moments
