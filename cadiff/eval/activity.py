"""Neural activity statistics of a movie from ROI traces: dF/F, calcium events, event rate and amplitude.

A movie ``[T, H, W]`` in photon units and ROI masks ``[N, H, W]`` (the simulator's ground-truth footprints, or
detected ROIs) give one mean trace per ROI. ``dF/F = (F - F0) / F0`` with ``F0`` a percentile of the trace, by
default the median: with sparse activity (the ``two_photon`` preset's cells are active ~10% of the time) the
median is the resting level, and noise alone then gives dF/F centred on 0 (a low percentile would shift a silent
trace up by a fraction of its noise). Jia et al. 2011 (Nat. Protoc. 6:28) use a running low percentile of
smoothed traces for minutes-long recordings; one level per trace suffices for the seconds-long movies scored here. An event starts where dF/F rises above ``k`` robust standard
deviations of its noise (1.4826 x the median absolute deviation of the first difference over sqrt 2, which the
slow calcium transients barely move) and lasts until it falls below ``end_sigma`` deviations (hysteresis, so a
decaying tail that flickers around the start threshold stays one event); its amplitude is the peak dF/F inside.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cadiff.errors import DataError
from cadiff.eval.metrics import wasserstein1

MAD_TO_STD = 1.4826  # std of a Gaussian over its median absolute deviation


def roi_traces(movie: np.ndarray, rois: np.ndarray) -> np.ndarray:
    """Mean trace ``[N, T]`` (float64) of each non-empty ROI of ``rois [N, H, W]`` in ``movie [T, H, W]``."""
    movie, rois = np.asarray(movie), np.asarray(rois, dtype=bool)
    if movie.ndim != 3 or rois.ndim != 3 or rois.shape[1:] != movie.shape[1:]:
        raise DataError(f"roi_traces: movie {movie.shape} and ROIs {rois.shape}, expected [T, H, W] and [N, H, W] "
                        "with the same H, W")
    kept = rois[rois.any(axis=(1, 2))]
    flat = movie.reshape(len(movie), -1).astype(np.float64)
    return np.stack([flat[:, roi.ravel()].mean(axis=1) for roi in kept]) if len(kept) else np.zeros((0, len(movie)))


def delta_f_over_f(traces: np.ndarray, baseline_percentile: float = 50.0) -> np.ndarray:
    """``(F - F0) / F0`` per row of ``traces [N, T]``; rows whose resting level ``F0`` is not positive are NaN."""
    traces = np.atleast_2d(np.asarray(traces, dtype=np.float64))
    f0 = np.percentile(traces, baseline_percentile, axis=1, keepdims=True) if traces.size else traces[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f0 > 0, (traces - f0) / np.where(f0 > 0, f0, 1.0), np.nan)


def noise_sigma(dff: np.ndarray) -> float:
    """Robust noise std of one dF/F trace from the MAD of its first difference."""
    diff = np.diff(dff)
    return float(MAD_TO_STD * np.median(np.abs(diff - np.median(diff))) / math.sqrt(2.0))


def detect_events(dff: np.ndarray, threshold_sigma: float = 3.0, end_sigma: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(onset frames, peak dF/F) of the events of ``dff [T]``: above ``threshold_sigma`` noise stds until below
    ``end_sigma``."""
    dff = np.asarray(dff, dtype=np.float64)
    sigma = noise_sigma(dff) if len(dff) > 2 else 0.0
    if not np.isfinite(dff).all() or not sigma > 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    onsets, peaks, start = [], [], None
    for i, value in enumerate(dff - np.median(dff)):
        if start is None and value > threshold_sigma * sigma:
            start = i
        elif start is not None and value < end_sigma * sigma:
            onsets.append(start)
            peaks.append(dff[start:i].max())
            start = None
    if start is not None:
        onsets.append(start)
        peaks.append(dff[start:].max())
    return np.array(onsets, dtype=int), np.array(peaks)


def activity_stats(movie: np.ndarray, rois: np.ndarray, rate_hz: float, threshold_sigma: float = 3.0
                   ) -> dict[str, np.ndarray]:
    """Per-ROI event rates (Hz) and every event's peak dF/F of ``movie`` over ``rois`` (ROIs with F0 <= 0 left out)."""
    if not rate_hz > 0:
        raise DataError(f"activity_stats: rate_hz = {rate_hz}, expected a positive frame rate")
    dff = delta_f_over_f(roi_traces(movie, rois))
    rates, amplitudes = [], []
    for row in dff[np.isfinite(dff).all(axis=1)]:
        onsets, peaks = detect_events(row, threshold_sigma)
        rates.append(len(onsets) * rate_hz / len(row))
        amplitudes.append(peaks)
    return {"event_rate_hz": np.array(rates), "amplitude_dff": np.concatenate(amplitudes) if amplitudes else np.zeros(0)}


def pool_stats(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate the per-movie outputs of :func:`activity_stats`."""
    return {key: np.concatenate([s[key] for s in stats]) if stats else np.zeros(0)
            for key in ("event_rate_hz", "amplitude_dff")}


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def compare_activity(gen: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    """Medians, counts and Wasserstein-1 distances of the event-rate and amplitude distributions of two sets."""
    out: dict[str, Any] = {}
    for key in ("event_rate_hz", "amplitude_dff"):
        g, r = gen[key], ref[key]
        out[key] = {"median_gen": _median(g), "median_ref": _median(r), "n_gen": len(g), "n_ref": len(r),
                    "w1": wasserstein1(g, r) if len(g) and len(r) else None}
    return out
