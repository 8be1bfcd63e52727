"""suite2p as a downstream judge: does the field's standard pipeline find the same kind of cells in generated
movies as in real (or simulated) ones?

``jobs/evaluate.py judge=suite2p`` runs suite2p's functional ROI detection (registration, sparse detection,
trace extraction and its built-in classifier; CPU) on every whole movie of the generated and the reference set,
then compares per set:

- **ROI density**: ROIs per 10,000 pixels of field of view (suite2p's ``stat`` entries, classified or not);
- **ROI size**: suite2p's ``npix`` per ROI;
- **ROI SNR**: on the neuropil-corrected trace ``F - 0.7 Fneu`` (suite2p's default neuropil coefficient), the
  99th percentile above the median divided by the frame-to-frame noise ``1.4826 MAD(diff) / sqrt(2)``;
- **cell fraction**: the share of ROIs suite2p's classifier calls cells (``iscell``).

Sizes and SNRs are compared as distributions (two-sample Kolmogorov-Smirnov statistic, 0 = identical, 1 =
disjoint) and by their median ratio; density by the generated / reference ratio. Where a movie has ground truth
(a ``<movie>.npz`` with ``rois`` [N, H, W] next to it, as ``jobs/export.py`` writes), suite2p's ROIs are matched
to the true ones one-to-one at IoU >= 0.5 (:func:`cadiff.eval.rois.match_rois`) and F1, precision and recall are
reported. A suite2p ROI's mask for matching is its pixels with weight ``lam >= 0.3 x`` its peak, the same rule
as the simulator's ground-truth ROIs (``footprint >= 0.3``).

suite2p is an optional extra (``make setup`` installs it; see the Makefile for why it goes in without its
cellpose dependency). The pinned release, 0.14.6, fails to estimate the spatial scale under numpy 2, so the
judge always passes ``spatial_scale`` (1: cells ~6 px across, suite2p's smallest scale; the simulator's cells
are 5-8 px). suite2p's movies are int16: an integer movie that does not fit, or a float movie with fractions, is
shifted and scaled first (:func:`to_int16`; the movies rescaled are listed per set).

suite2p registers each movie into a binary file in a private temporary folder (deleted afterwards); detection,
extraction and its built-in classifier run on that file in this process, so its ROIs never pass through a pickle.
Its console output goes to ``<out>/suite2p/<set>/<movie>.log`` and its ROIs to ``<movie>_rois.npz``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from cadiff.config import Suite2pJudgeConfig
from cadiff.data.conditioning import TRUTH_ROIS_KEY
from cadiff.errors import DataError
from cadiff.eval.inputs import INDEX_FILE, movie_files, movie_root, read_calibration_file, read_movie
from cadiff.eval.rois import match_rois, pool_matches
from cadiff.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

NEUROPIL_COEFFICIENT = 0.7  # suite2p's default ``neucoeff``
ROI_FRACTION = 0.3  # mask = lam >= 0.3 x peak: the simulator's ground-truth ROI rule (cadiff/data/export.py)
DENSITY_PIXELS = 10_000
INT16_MAX = np.iinfo(np.int16).max


def suite2p_available() -> bool:
    try:
        import suite2p  # noqa: F401
    except ImportError:
        return False
    return True


def require_suite2p() -> None:
    if not suite2p_available():
        raise DataError("judge=suite2p: the suite2p package is not installed; install the judge extra "
                        "(`make setup`, or `pip install -e '.[judge]'` then `pip install --no-deps suite2p==0.14.6`)")


@dataclass
class JudgeMovie:
    """One whole movie for the judge, with its ground-truth ROIs when known."""

    name: str
    frames: np.ndarray  # [T, H, W]
    rate_hz: float
    truth: np.ndarray | None = None  # [N, H, W] bool


@dataclass
class Detection:
    """suite2p's ROIs of one movie."""

    masks: np.ndarray  # [N, H, W] bool, lam >= ROI_FRACTION x peak
    npix: np.ndarray  # [N] suite2p's ROI size
    snr: np.ndarray  # [N]
    iscell: np.ndarray  # [N] classifier probability
    int16_scale: float = 1.0  # the factor applied to fit int16 (1: none)


# ---------------------------------------------------------------------------------------------------------
# inputs


def judge_movie_files(path: str | Path) -> tuple[Path, list[Path]]:
    """The folder and movie files the judge reads from ``path``; DataError for a shard folder or no movies (checked
    before an evaluation starts, so a wrong ``gen``/``ref`` fails at once)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"judge=suite2p: {root} does not exist, expected a folder of TIFF/HDF5 movies or an export folder")
    if root.is_dir() and (root / INDEX_FILE).is_file():
        raise DataError(f"judge=suite2p: {root} is a shard folder of short clips; suite2p needs whole movies: pass an "
                        "export folder (jobs/export.py) or a folder of TIFF/HDF5 movies")
    root = movie_root(root)
    files = movie_files(root)
    if not files:
        raise DataError(f"judge=suite2p: {root} holds no .tif/.tiff/.h5/.hdf5 movies")
    return root, files


def load_judge_movies(path: str | Path, max_movies: int, min_frames: int, hdf5_key: str = "data",
                      fallback_rate_hz: float | None = None) -> list[JudgeMovie]:
    """Whole movies of a movie folder, a movie file or an export folder (first ``max_movies`` by name)."""
    root, files = judge_movie_files(path)
    folder_cal = read_calibration_file(root)
    movies = []
    for path in files[:max_movies]:
        movie = read_movie(path, hdf5_key, folder_cal.rate_hz if folder_cal else None)
        if movie.num_frames < min_frames:
            raise DataError(f"judge=suite2p: {path} has {movie.num_frames} frames, expected >= {min_frames} "
                            "(suite2p.min_frames); sample longer movies (jobs/sample.py num_frames=...)")
        rate = movie.rate_hz or fallback_rate_hz
        if not rate:
            raise DataError(f"judge=suite2p: {path} has no frame rate; write samples.json with rate_hz next to it")
        movies.append(JudgeMovie(path.stem, np.asarray(movie.frames(0, movie.num_frames)), float(rate),
                                 _read_truth(path, movie.shape[1:])))
    return movies


def _read_truth(movie_path: Path, frame_shape: tuple[int, int]) -> np.ndarray | None:
    path = movie_path.with_suffix(".npz")
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if TRUTH_ROIS_KEY not in npz.files:
                return None
            rois = np.asarray(npz[TRUTH_ROIS_KEY])
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ground truth ({exc}), expected an .npz with '{TRUTH_ROIS_KEY}' [N, H, W]") from None
    if rois.ndim != 3 or tuple(rois.shape[1:]) != tuple(frame_shape):
        raise DataError(f"{path}: '{TRUTH_ROIS_KEY}' has shape {rois.shape}, expected [N, {frame_shape[0]}, {frame_shape[1]}]")
    return rois.astype(bool)


# ---------------------------------------------------------------------------------------------------------
# running suite2p


def to_int16(frames: np.ndarray) -> tuple[np.ndarray, float]:
    """The movie as int16 for suite2p; returns (movie, scale). Integer movies that fit are kept as they are; others
    are shifted to start at 0, and scaled to int16's range when they hold fractions (processed float movies, which
    rounding would flatten) or span more than it. Detection normalizes by each pixel's spread, so neither changes
    what suite2p finds."""
    x = np.asarray(frames, dtype=np.float64)
    if not np.isfinite(x).all():
        raise DataError("judge=suite2p: the movie holds NaN/inf values, expected finite pixels")
    lo, hi = float(x.min()), float(x.max())
    integer = bool(np.array_equal(x, np.rint(x)))
    if integer and lo >= -INT16_MAX and hi <= INT16_MAX:
        return x.astype(np.int16), 1.0
    span = hi - lo
    scale = 1.0 if (integer and span <= INT16_MAX) or span == 0 else INT16_MAX / span
    return np.rint((x - lo) * scale).astype(np.int16), scale


def roi_snr(f: np.ndarray, fneu: np.ndarray) -> np.ndarray:
    """Per ROI: (p99 - median) of ``F - 0.7 Fneu`` over its frame-to-frame noise ``1.4826 MAD(diff) / sqrt 2``."""
    fc = np.asarray(f, np.float64) - NEUROPIL_COEFFICIENT * np.asarray(fneu, np.float64)
    if fc.ndim != 2 or fc.shape[1] < 3:
        return np.zeros(len(fc))
    d = np.diff(fc, axis=1)
    noise = 1.4826 * np.median(np.abs(d - np.median(d, axis=1, keepdims=True)), axis=1) / math.sqrt(2)
    signal = np.percentile(fc, 99, axis=1) - np.median(fc, axis=1)
    return np.divide(signal, noise, out=np.zeros_like(signal), where=noise > 0)


def stat_masks(stat: Any, frame_shape: tuple[int, int]) -> np.ndarray:
    """suite2p ``stat`` entries -> bool masks of the pixels with ``lam >= ROI_FRACTION x`` the ROI's peak."""
    masks = np.zeros((len(stat), *frame_shape), dtype=bool)
    for k, s in enumerate(stat):
        lam = np.asarray(s["lam"], dtype=np.float64)
        keep = lam >= ROI_FRACTION * lam.max() if lam.size else np.zeros(0, bool)
        masks[k, np.asarray(s["ypix"])[keep], np.asarray(s["xpix"])[keep]] = True
    return masks


def _suite2p_ops(settings: Suite2pJudgeConfig, rate_hz: float) -> dict[str, Any]:
    import suite2p

    ops = suite2p.default_ops()
    ops.update(fs=float(rate_hz), tau=settings.tau, spatial_scale=settings.spatial_scale,
               threshold_scaling=settings.threshold_scaling, nonrigid=settings.nonrigid, sparse_mode=True,
               spikedetect=False, force_sktiff=True, save_mat=False, delete_bin=False, move_bin=False,
               keep_movie_raw=False, use_builtin_classifier=True)
    return ops


def run_suite2p(movie: JudgeMovie, settings: Suite2pJudgeConfig, log_path: Path) -> Detection:
    """suite2p's functional pipeline on one movie in a private temporary folder (deleted afterwards).

    ``run_s2p`` registers the movie into a binary file; detection, extraction and the built-in classifier then run
    here on that file (the steps ``run_s2p`` would take next), so the ROIs come back in memory: suite2p saves them
    only as a pickled ``stat.npy``, which cadiff never unpickles."""
    import suite2p
    import tifffile
    from suite2p import classification, detection, extraction, io

    frames, scale = to_int16(movie.frames)
    frame_shape = tuple(frames.shape[1:])
    empty = Detection(np.zeros((0, *frame_shape), bool), np.zeros(0), np.zeros(0), np.zeros(0), scale)
    work = Path(tempfile.mkdtemp(prefix="cadiff-suite2p-"))
    try:
        data = work / "data"
        data.mkdir()
        tifffile.imwrite(data / f"{movie.name}.tif", frames)
        db = {"data_path": [str(data)], "save_path0": str(work), "fast_disk": str(work / "fast")}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        classfile = classification.builtin_classfile
        # the log is diagnostic, written as suite2p runs (so a failure leaves it to read)
        with open(log_path, "w") as fh, contextlib.redirect_stdout(fh):
            try:
                ops = suite2p.run_s2p(ops={**_suite2p_ops(settings, movie.rate_hz), "roidetect": False}, db=db)
                with io.BinaryFile(Ly=ops["Ly"], Lx=ops["Lx"], filename=ops["reg_file"], n_frames=ops["nframes"]) as f_reg:
                    ops, stat = detection.detection_wrapper(f_reg, ops=ops, classfile=classfile)
                    if not len(stat):
                        return empty
                    stat, f, fneu, _, _ = extraction.extraction_wrapper(stat, f_reg, f_reg_chan2=None, ops=ops)
                iscell = classification.classify(stat=stat, classfile=classfile)
            except ValueError as exc:
                if "no ROIs were found" not in str(exc):
                    raise DataError(f"judge=suite2p: suite2p failed on {movie.name} ({exc}); see {log_path}") from None
                print(f"cadiff: suite2p found no ROIs ({exc})", file=fh)
                return empty
        npix = np.array([float(s["npix"]) for s in stat])
        return Detection(stat_masks(stat, frame_shape), npix, roi_snr(f, fneu), np.asarray(iscell)[:, 1].astype(float),
                         scale)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# summaries and comparison


def _quartiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"median": None, "p25": None, "p75": None}
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75)}


def summarize_detections(movies: list[JudgeMovie], detections: list[Detection], iou: float) -> dict[str, Any]:
    """Per-set figures: ROI density, size and SNR quartiles, cell fraction, and F1 where ground truth exists."""
    sizes, snrs = _pooled(detections, "npix"), _pooled(detections, "snr")
    cells = int(sum((d.iscell > 0.5).sum() for d in detections))
    pixels = int(sum(int(np.prod(m.frames.shape[1:])) for m in movies))
    summary: dict[str, Any] = {
        "movies": len(movies),
        "frames": int(sum(m.frames.shape[0] for m in movies)),
        "pixels": pixels,
        "rois": int(len(sizes)),
        "cells": cells,
        "cell_fraction": cells / len(sizes) if len(sizes) else None,
        "density_per_10k_px": len(sizes) / pixels * DENSITY_PIXELS if pixels else None,
        "size_px": _quartiles(sizes),
        "snr": _quartiles(snrs),
        "int16_rescaled": [m.name for m, d in zip(movies, detections) if d.int16_scale != 1.0],
        "truth": None,
    }
    scored = [(m, d) for m, d in zip(movies, detections) if m.truth is not None]
    if scored:
        per_movie = {m.name: match_rois(d.masks, m.truth, iou) for m, d in scored}
        summary["truth"] = {"iou": iou, "movies": len(scored), **pool_matches(list(per_movie.values())),
                            "per_movie": per_movie}
    return summary


def _ks(a: np.ndarray, b: np.ndarray) -> float | None:
    return float(ks_2samp(a, b).statistic) if len(a) and len(b) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _pooled(detections: list[Detection], key: str) -> np.ndarray:
    return np.concatenate([getattr(d, key) for d in detections]) if detections else np.zeros(0)


def compare_detections(gen: dict[str, Any], ref: dict[str, Any], gen_det: list[Detection],
                       ref_det: list[Detection]) -> dict[str, Any]:
    """Generated vs reference: density ratio, size and SNR KS statistics and median ratios.

    ``*_ks_baseline`` is the same statistic between the reference's even and odd movies (None with fewer than two):
    how far two samples of the reference itself are apart, the level a generator cannot be expected to beat.
    """
    halves = (ref_det[0::2], ref_det[1::2])
    return {
        "density_ratio": _ratio(gen["density_per_10k_px"], ref["density_per_10k_px"]),
        "size_ks": _ks(_pooled(gen_det, "npix"), _pooled(ref_det, "npix")),
        "size_ks_baseline": _ks(*(_pooled(h, "npix") for h in halves)),
        "size_median_ratio": _ratio(gen["size_px"]["median"], ref["size_px"]["median"]),
        "snr_ks": _ks(_pooled(gen_det, "snr"), _pooled(ref_det, "snr")),
        "snr_ks_baseline": _ks(*(_pooled(h, "snr") for h in halves)),
        "snr_median_ratio": _ratio(gen["snr"]["median"], ref["snr"]["median"]),
    }


def detect_set(movies: list[JudgeMovie], settings: Suite2pJudgeConfig, log_dir: Path, rois_dir: Path | None = None
               ) -> list[Detection]:
    """suite2p on every movie of a set; each movie's ROIs are saved to ``rois_dir/<movie>_rois.npz`` when given."""
    from tqdm import tqdm

    detections = []
    for movie in tqdm(movies, desc=f"suite2p {log_dir.name}", unit="movie", disable=None):
        det = run_suite2p(movie, settings, log_dir / f"{movie.name}.log")
        log.info("suite2p %s/%s: %d ROIs (%d cells)", log_dir.name, movie.name, len(det.npix), int((det.iscell > 0.5).sum()))
        if rois_dir is not None:
            with atomic_path(rois_dir / f"{movie.name}_rois.npz", suffix=".npz") as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, masks=det.masks, npix=det.npix, snr=det.snr, iscell=det.iscell)
        detections.append(det)
    return detections


def judge_movies(gen: list[JudgeMovie], ref: list[JudgeMovie], settings: Suite2pJudgeConfig, work: Path,
                 keep_rois: bool = False) -> dict[str, Any]:
    """suite2p on two sets of movies: each set's figures, their comparison and the pooled ROI sizes and SNRs.
    Logs go to ``work/<set>/``, and with ``keep_rois`` each movie's ROIs too."""
    sets, detections = {}, {}
    for key, movies in (("gen", gen), ("ref", ref)):
        detections[key] = detect_set(movies, settings, work / key, work / key if keep_rois else None)
        sets[key] = summarize_detections(movies, detections[key], settings.iou)
    return {
        "settings": asdict(settings),
        "gen": sets["gen"],
        "ref": sets["ref"],
        "compare": compare_detections(sets["gen"], sets["ref"], detections["gen"], detections["ref"]),
        "sizes": {k: [float(v) for d in detections[k] for v in d.npix] for k in detections},
        "snrs": {k: [float(v) for d in detections[k] for v in d.snr] for k in detections},
    }


def judge_suite2p(gen: str | Path, ref: str | Path, out: str | Path, settings: Suite2pJudgeConfig,
                  hdf5_key: str = "data") -> dict[str, Any]:
    """The suite2p section of an evaluation: both sets' figures and their comparison (``metrics["suite2p"]``)."""
    require_suite2p()
    out = Path(out) / "suite2p"
    ref_movies = load_judge_movies(ref, settings.max_movies, settings.min_frames, hdf5_key)
    gen_movies = load_judge_movies(gen, settings.max_movies, settings.min_frames, hdf5_key,
                                   fallback_rate_hz=ref_movies[0].rate_hz)
    result = judge_movies(gen_movies, ref_movies, settings, out, keep_rois=True)
    write_text_atomic(out / "README.txt", "suite2p judge: <set>/<movie>.log is suite2p's console output, "
                      "<set>/<movie>_rois.npz its ROIs (masks: lam >= 0.3 x peak, npix, snr, iscell probability)\n")
    return result
