"""prepare_data: read source movies, calibrate noise, tile clips, split by recording, write shards + index.

Everything streams: a movie is read in clip-length frame chunks (``read_frames``), calibration reads short
windows, and at most one shard's clips are in memory, so a 2000x512x512 memmapped movie converts with a
small, bounded RSS (``benchmarks/prepare_rss.py``).

Splits are by recording, never by clip: ``round(val_fraction * recordings)`` recordings (at least one when
there are two or more and ``val_fraction > 0``) go to ``val``, chosen by a seeded permutation. A single
recording is split in time instead: its last ``val_fraction`` of frames (at least one clip length) is the
validation block, the frames before it the training block, so no clip straddles the boundary. Calcium
decays (~1 s) still correlate the few frames on either side of the boundary; that leakage is accepted.

Re-running with the same config skips finished shards (or returns at once when ``index.json`` is complete);
a changed config or changed input files removes the old shards first (``.prepare_state.json`` fingerprint).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cadiff.data.anscombe import anscombe
from cadiff.data.movie import UINT16_MAX, Movie, read_frames
from cadiff.data.noise import estimate_photon_transfer
from cadiff.data.shards import INDEX_NAME, read_index, write_index, write_shards
from cadiff.data.simulate import simulate_movie
from cadiff.data.sources.hdf5 import HDF5_SUFFIXES, read_hdf5
from cadiff.data.sources.tiff import read_tiff
from cadiff.errors import DataError
from cadiff.io import write_json_atomic
from cadiff.runinfo import record_run

log = logging.getLogger(__name__)

STATE_NAME = ".prepare_state.json"
SHARD_PREFIX = "clips"


@dataclass
class Recording:
    """One recording: a stable id, a description (path) and a lazy opener."""

    rec_id: str
    where: str
    open: Callable[[], Movie]


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


def list_recordings(src: Any) -> list[Recording]:
    """Recordings named by the ``source`` config (files are opened lazily, archives are downloaded here)."""
    name = src.name
    if name == "sim":
        def sim(i: int) -> Callable[[], Movie]:
            return lambda: simulate_movie(preset=src.preset, frames=src.frames, height=src.height, width=src.width,
                                          num_neurons=src.num_neurons, seed=src.seed + i, rate_hz=src.rate_hz,
                                          return_clean=False)[0]

        return [Recording(f"sim-{i:03d}", f"simulator preset={src.preset} seed={src.seed + i}", sim(i))
                for i in range(src.num_movies)]
    if name == "tiff":
        paths = _expand(src.path, "TIFF file or folder")
        return [Recording(_safe_id(p.stem), str(p), (lambda p=p: read_tiff(p, rate_hz=src.rate_hz))) for p in paths]
    if name == "hdf5":
        paths = []
        for p in _expand(src.path, "HDF5 file or folder"):
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in HDF5_SUFFIXES) if p.is_dir() else [p]
            if not found:
                raise DataError(f"{p}: no .h5/.hdf5 files in the folder")
            paths += found
        return [Recording(_safe_id(p.stem), f"{p}:{src.key}", (lambda p=p: read_hdf5(p, src.key, rate_hz=src.rate_hz)))
                for p in paths]
    if name == "neurofinder":
        from cadiff.data.sources import neurofinder

        ids = [neurofinder.normalize_id(i) for i in src.ids]
        folders = neurofinder.download(ids, src.cache_dir, src.base_url)
        return [Recording(_safe_id(f"neurofinder-{i}"), str(f), (lambda f=f: neurofinder.read_neurofinder(f, src.rate_hz)))
                for i, f in zip(ids, folders)]
    if name == "allen":
        from cadiff.data.sources import allen

        files = allen.download(list(src.ids), src.cache_dir, src.base_url)
        return [Recording(_safe_id(f"allen-{i}"), str(f), (lambda f=f: allen.read_allen(f, src.key, src.rate_hz)))
                for i, f in zip(src.ids, files)]
    raise DataError(f"source.name {name!r}: expected sim, tiff, hdf5, neurofinder or allen")


# ---------------------------------------------------------------------------------------------------------
# calibration, tiling, dtype


def calibrate(movie: Movie, src: Any, where: str) -> dict[str, Any]:
    """Per-recording calibration: given ``source.gain/offset`` win, the rest is estimated by photon transfer."""
    given_gain, given_offset = src.gain, src.offset
    entry: dict[str, Any] = {"rate_hz": float(movie.rate_hz)}
    if movie.pixel_size_um is not None:  # carried to the TIFFs sample.py writes
        entry["pixel_size_um"] = float(movie.pixel_size_um)
    if given_gain is not None and given_offset is not None:
        entry.update(gain=float(given_gain), offset=float(given_offset), read_noise=float(src.read_noise or 0.0),
                     calibration="given")
    else:
        try:
            pt = estimate_photon_transfer(movie.data, max_frames=src.calibration_frames)
        except DataError as exc:
            raise DataError(f"{where}: noise calibration failed: {exc}") from exc
        if pt.r2 < 0.5:
            log.warning("%s: photon-transfer fit is poor (r2 %.2f); consider source.gain/source.offset", where, pt.r2)
        gain = float(given_gain if given_gain is not None else pt.gain)
        if given_offset is not None:
            # a true (dark) offset above the PT intercept carries read noise: var = g (offset - intercept)
            entry.update(offset=float(given_offset), read_noise=math.sqrt(max(0.0, gain * (given_offset - pt.offset))))
        else:
            # the intercept as offset with zero read noise reproduces the fitted mean-variance line exactly
            entry.update(offset=float(pt.offset), read_noise=0.0)
        entry.update(gain=gain, calibration="photon_transfer", photon_transfer=pt.as_dict())
    for key in ("gain", "offset", "read_noise"):
        value = getattr(movie, key)
        if value is not None:
            entry[f"true_{key}"] = float(value)  # the simulator's ground truth, for comparison
    if entry["gain"] <= 0:
        raise DataError(f"{where}: gain {entry['gain']} ADU/photon, expected > 0")
    return entry


def storage_dtype(dtypes: list[np.dtype]) -> np.dtype:
    """int16 when every recording is int16 (kept exact), else uint16."""
    return np.dtype(np.int16) if all(d == np.int16 for d in dtypes) else np.dtype(np.uint16)


def to_storage(chunk: np.ndarray, dtype: np.dtype, where: str, t0: int) -> np.ndarray:
    """Convert frames to the integer storage dtype; NaN/Inf or out-of-range integers are DataErrors."""
    if chunk.dtype == dtype:
        return chunk
    if np.issubdtype(chunk.dtype, np.floating):
        if not np.isfinite(chunk).all():
            bad = int(np.argwhere(~np.isfinite(chunk))[0][0]) + t0
            raise DataError(f"{where}: frame {bad} contains NaN/Inf; expected finite intensities")
        info = np.iinfo(dtype)
        rounded = np.rint(chunk)
        clipped = int(((rounded < info.min) | (rounded > info.max)).sum())
        if clipped:
            log.warning("%s: %d values outside the %s range were clipped (frames %d+)", where, clipped, dtype, t0)
        return np.clip(rounded, info.min, info.max).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = chunk.min(), chunk.max()
    if lo < info.min or hi > info.max:
        if dtype == np.uint16 and chunk.dtype == np.int16:
            log.warning("%s: negative int16 values clipped to 0 for uint16 storage (frames %d+)", where, t0)
            return np.clip(chunk, 0, UINT16_MAX).astype(dtype)
        raise DataError(f"{where}: values {lo}..{hi} do not fit {dtype}; expected detector ADU")
    return chunk.astype(dtype)


def clip_positions(num_frames: int, height: int, width: int, clip: Any, t_range: tuple[int, int]) -> list[tuple]:
    """``(t0, y0, x0)`` of every clip inside frames ``t_range`` on the stride grid."""
    st = clip.stride_frames or clip.frames
    sp_y = clip.stride_px or clip.height
    sp_x = clip.stride_px or clip.width
    ts = range(t_range[0], t_range[1] - clip.frames + 1, st)
    ys = range(0, height - clip.height + 1, sp_y)
    xs = range(0, width - clip.width + 1, sp_x)
    return [(t, y, x) for t in ts for y in ys for x in xs]


def iter_clips(movie: Movie, rec_id: str, clip: Any, t_range: tuple[int, int], dtype: np.dtype,
               split: str, where: str) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Stream clips of one recording: one clip-length chunk of frames in memory at a time."""
    _, height, width = movie.shape
    positions = clip_positions(movie.num_frames, height, width, clip, t_range)
    for t0 in sorted({p[0] for p in positions}):
        chunk = to_storage(read_frames(movie.data, t0, t0 + clip.frames), dtype, where, t0)
        for _, y0, x0 in (p for p in positions if p[0] == t0):
            tile = np.ascontiguousarray(chunk[:, y0: y0 + clip.height, x0: x0 + clip.width])
            meta = {"source": rec_id, "recording": rec_id, "t0": t0, "y0": y0, "x0": x0, "split": split}
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
# the job


def _fingerprint(cfg: Any, recordings: list[Recording]) -> str:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    relevant = {k: plain.get(k) for k in ("source", "clip", "normalization", "val_fraction", "clips_per_shard", "seed")}
    files = []
    for rec in recordings:
        path = Path(rec.where.split(":")[0])
        if path.exists():
            members = sorted(path.rglob("*")) if path.is_dir() else [path]
            files.append([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in members if p.is_file()])
    text = json.dumps({"config": relevant, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _reset_outputs(out: Path) -> None:
    for split_dir in (out / "train", out / "val"):
        for stale in split_dir.glob(f"{SHARD_PREFIX}-*.tar"):
            stale.unlink()
    (out / INDEX_NAME).unlink(missing_ok=True)


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
        "sources": {k: {"gain": v["gain"], "offset": v["offset"]} for k, v in index["sources"].items()},
        "normalization": index["normalization"],
        "out": str(out),
    }


def prepare_data(cfg: Any) -> dict[str, Any]:
    """Run the whole preparation for a ``PrepareDataConfig``; returns a summary dict (counts, shapes, paths)."""
    out = Path(cfg.out)
    clip = cfg.clip
    recordings = list_recordings(cfg.source)
    if not recordings:
        raise DataError(f"source {cfg.source.name}: no recordings found")
    if len({r.rec_id for r in recordings}) != len(recordings):
        raise DataError(f"source {cfg.source.name}: recording names collide: {[r.where for r in recordings]}")
    fingerprint = _fingerprint(cfg, recordings)
    state_path = out / STATE_NAME
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (OSError, ValueError):
        state = {}
    if state.get("fingerprint") == fingerprint and (out / INDEX_NAME).is_file():
        try:
            index = read_index(out)
            log.info("%s is already prepared with this config; nothing to do", out)
            return _summary(index, out)
        except DataError as exc:
            log.warning("existing index unusable (%s): preparing again", exc)
    # movies are re-opened for tiling rather than kept: file movies are lazy anyway, and simulated ones are
    # regenerated from their seed instead of all being held in memory at once
    frames: dict[str, int] = {}
    dtypes: list[np.dtype] = []
    sources: dict[str, dict] = {}
    for rec in recordings:
        movie = rec.open()
        t, h, w = movie.shape
        if t < clip.frames or h < clip.height or w < clip.width:
            raise DataError(f"{rec.where}: movie {movie.shape} is smaller than one clip "
                            f"{clip.frames}x{clip.height}x{clip.width}; expected at least that many frames/pixels")
        calib = calibrate(movie, cfg.source, rec.where)
        calib.update(recording=rec.rec_id, path=rec.where, shape=[t, h, w], dtype=str(movie.dtype))
        log.info("%s: %s, gain %.4g ADU/photon, offset %.2f ADU", rec.rec_id, movie.shape, calib["gain"], calib["offset"])
        frames[rec.rec_id], sources[rec.rec_id] = t, calib
        dtypes.append(movie.dtype)
        del movie
    dtype = storage_dtype(dtypes)

    val_ids = _split_recordings(recordings, cfg.val_fraction, cfg.seed)
    ranges: dict[str, dict[str, tuple[int, int]]] = {"train": {}, "val": {}}
    split_by = "recording"
    for rec in recordings:
        n = frames[rec.rec_id]
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

    # every input is opened and calibrated before anything is written: bad input leaves no output behind
    if state.get("fingerprint") not in (None, fingerprint):
        log.info("%s was prepared with a different config or input: removing its shards", out)
        _reset_outputs(out)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path, {"fingerprint": fingerprint, "complete": False})
    record_run(out, cfg, "prepare_data")
    by_id = {r.rec_id: r for r in recordings}
    moments = RunningMoments()
    norm_kind = cfg.normalization.kind

    def samples(split: str) -> Iterator[tuple[str, np.ndarray, dict]]:
        for rec_id, t_range in ranges[split].items():
            calib = sources[rec_id]
            movie = by_id[rec_id].open()
            for key, tile, meta in iter_clips(movie, rec_id, clip, t_range, dtype, split, by_id[rec_id].where):
                if split == "train":
                    photons = (tile.astype(np.float32) - calib["offset"]) / calib["gain"]
                    rn = calib["read_noise"] / calib["gain"]
                    moments.add(anscombe(photons, rn) if norm_kind == "anscombe" else photons)
                yield key, tile, meta

    splits: dict[str, dict] = {}
    try:
        for split in ("train", "val"):
            shards = write_shards(samples(split), out, split, SHARD_PREFIX, cfg.clips_per_shard, kind="clips")
            splits[split] = {"shards": shards, "num_clips": sum(s["count"] for s in shards),
                             "recordings": sorted(ranges[split]),
                             "frame_ranges": {k: list(v) for k, v in ranges[split].items()}}
        if splits["train"]["num_clips"] == 0:
            raise DataError(f"{out}: no training clips (recordings {[r.where for r in recordings]} with clip "
                            f"{clip.frames}x{clip.height}x{clip.width}); lower val_fraction or the clip size")
    except DataError:
        _reset_outputs(out)  # bad input found mid-way (e.g. NaN in a late frame): remove what this run wrote
        state_path.unlink(missing_ok=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)  # the run record and split folders too: no partial output
        raise
    mean, std = moments.mean_std()
    center = float(cfg.normalization.center) if cfg.normalization.center is not None else mean
    scale = float(cfg.normalization.scale) if cfg.normalization.scale is not None else max(std, 1e-6)
    index = {
        "kind": "clips",
        "clip_shape": [clip.frames, clip.height, clip.width],
        "clip_stride": [clip.stride_frames or clip.frames, clip.stride_px or clip.height, clip.stride_px or clip.width],
        "dtype": str(dtype),
        "splits": splits,
        "split_by": split_by,
        "val_recordings": sorted(val_ids) if split_by == "recording" else [],
        "sources": sources,
        "normalization": {"kind": norm_kind, "center": center, "scale": scale},
        "source_config": cfg.source.name,
        "fingerprint": fingerprint,
    }
    write_index(out, index)
    write_json_atomic(state_path, {"fingerprint": fingerprint, "complete": True})
    return _summary(index, out)
