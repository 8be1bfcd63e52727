"""Noise calibration of a movie from the movie itself: photon transfer, a dark-pixel offset, raw-unit scales.

Photon transfer: for Poisson-Gaussian pixels ``var = gain * (mean - offset) + read_noise^2`` (Janesick,
"Photon Transfer", SPIE 2007), a line in (mean, variance) with slope ``gain`` and x-intercept
``offset - read_noise^2 / gain``. Gain and read noise cannot be separated from one movie without dark frames,
so the estimator reports the intercept; treating it as the offset with zero read noise gives the same
mean-variance line (a shifted Poisson), which is what normalization needs.

Calcium transients add signal variance to any temporal difference (plain frame differences overestimate the
gain about 2x on a realistic simulation), so the estimator
1. cuts the movie into short windows (default 8 frames) whose temporal mean is the local signal level;
2. takes frame-to-frame differences inside each window and removes each difference image's local spatial mean
   (3x3 box), which cancels the spatially smooth share of signal changes (neuropil, drift, cell interiors);
3. pairs every pixel-window's residual power with the same linear filter applied to the window mean
   (``m_eff``), so the relation stays exactly linear when the mean varies across neighbours;
4. bins samples by ``m_eff`` (equal-count bins), rejects the remaining outliers (sparse spike onsets) with a
   few rounds of sigma-clipping against the current line, and fits the line by weighted least squares.
Conditioning on the window mean keeps the fit unbiased for Poisson counts: given the total of ``w`` frames,
the squared difference of two of them has expectation ``2 * total / w``.

Photon-starved movies (raw two-photon data: well under one photon per pixel per frame) break step 4: a PMT's
single-photon pulse heights vary, so given a window total of one or two photons the conditional variance is
not linear in the total, and the binned curve bends (on the raw Allen sample the binned slope moves from 280
to 490 as the window grows from 4 to 16 frames). There the estimator (``method="auto"``) switches to the dark
level: most pixel-frames hold zero photons, so the histogram mode is the offset and the spread of the values
below it is the read noise; the gain then follows from the unconditional means, ``E[var] = gain * E[mean -
intercept]``, which holds whatever the pulse-height distribution (gain in ADU per photon-equivalent).

Movies without a usable mean-variance line (processed data: denoised, dF/F, log-scaled; or fewer frames than
one window) are handled by the two other methods of ``prepare_data``'s ``source.calibration``:
:func:`estimate_dark_calibration` fixes the offset at the darkest pixels and fits only the slope (``dark``), and
:func:`estimate_raw_scale` measures a robust level, spread and noise in the movie's own units, for normalization
without any photon scale (``none``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import uniform_filter

from cadiff.data.movie import read_frames
from cadiff.errors import DataError, NoPhotonSignature

# a photon-transfer line that explains less of the binned variance than this is no calibration
POOR_FIT_R2 = 0.5


@dataclass
class PhotonTransfer:
    """Fitted photon-transfer line ``var = gain * (mean - offset)``; ``offset`` is the x-intercept in ADU."""

    gain: float  # ADU per photon
    offset: float  # x-intercept: offset - read_noise^2 / gain
    means: np.ndarray  # binned m_eff used in the fit
    variances: np.ndarray  # binned noise variance per bin
    r2: float
    method: str = "binned"  # binned | dark (dark-level method) | dark_pixels (estimate_dark_calibration)
    read_noise: float | None = None  # ADU, only measured by the dark-level method
    num_samples: int = 0
    rejected_fraction: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def as_dict(self) -> dict[str, Any]:
        return {"gain": self.gain, "offset": self.offset, "r2": self.r2, "method": self.method,
                "read_noise": self.read_noise, "num_samples": self.num_samples,
                "rejected_fraction": self.rejected_fraction}


def _window_starts(num_frames: int, window: int, max_frames: int) -> list[int]:
    num_windows = num_frames // window
    keep = max(1, min(num_windows, max_frames // window))
    if num_windows == 0:
        return []
    return sorted({int(round(i)) * window for i in np.linspace(0, num_windows - 1, keep)})


def _clipped_values(dtype: np.dtype) -> tuple[float, float] | None:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return (0.0 if info.min == 0 else float(info.min), float(info.max))
    return None


def photon_transfer_samples(movie_adu: Any, window: int = 8, box: int = 3, max_frames: int = 1024,
                            max_samples: int = 2_000_000, seed: int = 0,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel-window ``(m_eff, noise variance)`` samples of a ``[T, H, W]`` movie, plus a sample of raw values.

    The movie is streamed window by window (``read_frames``), so lazy/memmapped movies stay on disk.
    """
    t, h, w = (int(s) for s in movie_adu.shape)
    if window < 2:
        raise DataError(f"photon transfer window {window}: expected >= 2 frames")
    starts = _window_starts(t, window, max_frames)
    if not starts:
        raise NoPhotonSignature(f"movie {tuple(movie_adu.shape)}: needs >= {window} frames to estimate photon transfer")
    k = box * box
    w_sum = 1.0 - 1.0 / k  # sum of squared weights of "pixel minus k-box mean"
    per_window = max(1, max_samples // len(starts))
    rng = np.random.default_rng(seed)
    clipped = _clipped_values(np.dtype(movie_adu.dtype).newbyteorder("="))
    means, variances, raw = [], [], []
    for s in starts:
        x = read_frames(movie_adu, s, s + window).astype(np.float64)
        if not np.isfinite(x).all():
            raise DataError(f"movie frames {s}:{s + window} contain NaN/Inf: expected finite intensities")
        d = np.diff(x, axis=0)
        r = d - uniform_filter(d, size=(1, box, box), mode="reflect")
        var = (r * r).mean(axis=0) / (2 * w_sum)
        m = x.mean(axis=0)
        m_eff = ((1 - 2.0 / k) * m + uniform_filter(m, size=box, mode="reflect") / k) / w_sum
        valid = np.zeros((h, w), dtype=bool)
        edge = box // 2  # border pixels see reflected (repeated) neighbours, which breaks the weight algebra
        valid[edge: h - edge, edge: w - edge] = True
        if clipped is not None:
            # a pixel at the dtype's floor/ceiling has lost variance; its whole box is unusable
            hit = ((x <= clipped[0]) | (x >= clipped[1])).any(axis=0).astype(np.float64)
            valid &= uniform_filter(hit, size=box, mode="reflect") == 0
        m_eff, var = m_eff[valid], var[valid]
        if m_eff.size > per_window:
            idx = rng.choice(m_eff.size, per_window, replace=False)
            m_eff, var = m_eff[idx], var[idx]
        means.append(m_eff)
        variances.append(var)
        frame = x[0].ravel()
        raw.append(frame if frame.size <= per_window else rng.choice(frame, per_window, replace=False))
    return np.concatenate(means), np.concatenate(variances), np.concatenate(raw)


def _binned(m: np.ndarray, v: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    edges = np.unique(np.quantile(m, np.linspace(0, 1, num_bins + 1)))
    if edges.size < 2:  # constant intensity: no spread of means to fit a line through
        empty = np.empty(0)
        return empty, empty, empty, empty
    which = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, len(edges) - 2)
    count = np.bincount(which, minlength=len(edges) - 1).astype(np.float64)
    ok = count >= 2
    sm = np.bincount(which, m, minlength=len(count))
    sv = np.bincount(which, v, minlength=len(count))
    sv2 = np.bincount(which, v * v, minlength=len(count))
    c = np.where(ok, count, 1)
    mean_m, mean_v = sm / c, sv / c
    se2 = np.maximum(sv2 / c - mean_v**2, 1e-12) / c
    return mean_m[ok], mean_v[ok], se2[ok], count[ok]


def _fit_line(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    wsum = weights.sum()
    xm, ym = (weights * x).sum() / wsum, (weights * y).sum() / wsum
    sxx = (weights * (x - xm) ** 2).sum()
    if sxx <= 0:
        return float("nan"), float("nan")
    slope = float((weights * (x - xm) * (y - ym)).sum() / sxx)
    return slope, float(ym - slope * xm)


def _check_sample_count(m: np.ndarray, num_bins: int, shape: tuple) -> None:
    if m.size < 4 * num_bins:
        raise NoPhotonSignature(f"movie {tuple(shape)}: only {m.size} unclipped pixel-windows, too few to fit a "
                        "photon-transfer line")


LineFit = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, float]]


def _clipped_fit(m: np.ndarray, v: np.ndarray, fit: LineFit, num_bins: int, window: int, clip_sigma: float,
                 rounds: int) -> tuple[np.ndarray, float, float, tuple]:
    """``fit`` (-> slope, intercept) on binned samples, rejecting outliers (spike onsets) by sigma-clipping.

    Returns the kept-sample mask, the line and the final bins ``(means, variances, se2, counts)``.
    """
    keep = np.ones(m.size, dtype=bool)
    # residual power of a pixel-window is a mean of (window - 1) correlated squares: relative std ~ sqrt(2/dof)
    dof = max(1.0, (window - 1) * 2.0 / 3.0)
    slope = intercept = float("nan")
    for _ in range(rounds):
        bm, bv, se2, _ = _binned(m[keep], v[keep], num_bins)
        if bm.size < 3:
            break
        slope, intercept = fit(bm, bv, 1.0 / se2)
        if not slope > 0:
            break
        predicted = np.maximum(slope * m + intercept, 1e-9)
        new_keep = (v / predicted - 1.0) / math.sqrt(2.0 / dof) < clip_sigma
        if (new_keep == keep).all():
            break
        keep = new_keep
    bins = _binned(m[keep], v[keep], num_bins)
    if bins[0].size >= 3:
        slope, intercept = fit(bins[0], bins[1], 1.0 / bins[2])
    return keep, slope, intercept, bins


def _r2(bm: np.ndarray, bv: np.ndarray, slope: float, intercept: float) -> float:
    resid = bv - (slope * bm + intercept)
    # every bin can be rejected on noise-free input (sigma-clipping against a ~0 line): no R^2, and no warning
    ss_tot = float(((bv - bv.mean()) ** 2).sum()) if bv.size else 0.0
    return 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 0.0


def estimate_photon_transfer(movie_adu: Any, window: int = 8, box: int = 3, num_bins: int = 32,
                             max_frames: int = 1024, max_samples: int = 2_000_000, clip_sigma: float = 8.0,
                             rounds: int = 4, method: str = "auto", starved_photons: float = 0.5,
                             seed: int = 0) -> PhotonTransfer:
    """Estimate gain (ADU/photon) and photon-transfer x-intercept (ADU) of a ``[T, H, W]`` movie.

    ``method``: ``binned`` (line fit), ``dark`` (dark-level method) or ``auto`` (``dark`` when the binned fit
    finds fewer than ``starved_photons`` photons per pixel per frame on average).
    """
    if method not in ("auto", "binned", "dark"):
        raise DataError(f"photon-transfer method {method!r}: expected 'auto', 'binned' or 'dark'")
    m, v, raw = photon_transfer_samples(movie_adu, window=window, box=box, max_frames=max_frames,
                                        max_samples=max_samples, seed=seed)
    _check_sample_count(m, num_bins, movie_adu.shape)
    keep, slope, intercept, (bm, bv, _, cnt) = _clipped_fit(m, v, _fit_line, num_bins, window, clip_sigma, rounds)
    if not (np.isfinite(slope) and slope > 0):
        raise NoPhotonSignature(f"movie {tuple(movie_adu.shape)}: photon-transfer slope {slope:.4g} is not positive "
                        "(no shot-noise signature: processed or constant data?)")
    x_intercept = -intercept / slope
    read_noise = None
    used = "binned"
    photons_per_frame = float(np.mean(m[keep]) - x_intercept) / slope
    if method == "dark" or (method == "auto" and photons_per_frame < starved_photons):
        slope, x_intercept, read_noise = _dark_level_fit(m[keep], v[keep], raw, slope)
        intercept = -slope * x_intercept
        used = "dark"
    return PhotonTransfer(gain=float(slope), offset=float(x_intercept), means=bm, variances=bv,
                          r2=_r2(bm, bv, slope, intercept), method=used, read_noise=read_noise,
                          num_samples=int(keep.sum()), rejected_fraction=float(1 - keep.mean()), counts=cnt)


def _dark_level_fit(m: np.ndarray, v: np.ndarray, raw: np.ndarray, gain: float) -> tuple[float, float, float]:
    """Dark-level method for photon-starved movies -> (gain, x-intercept, read noise), all in ADU."""
    values = np.rint(raw).astype(np.int64)
    lo = values.min()
    dark = float(np.bincount(values - lo).argmax() + lo)  # most pixel-frames hold zero photons
    below = raw[raw <= dark]
    read_noise = float(np.sqrt(np.mean((below - dark) ** 2)))  # half-normal RMS equals sigma
    intercept = dark
    for _ in range(3):  # the intercept depends weakly on the gain: offset - read_noise^2 / gain
        intercept = dark - read_noise**2 / gain
        excess = float(np.mean(m)) - intercept
        if not excess > 0:
            raise NoPhotonSignature("photon-starved movie: mean is not above the dark level")
        gain = float(np.mean(v)) / excess
    return gain, dark - read_noise**2 / gain, read_noise


# ---------------------------------------------------------------------------------------------------------
# offset from the darkest pixels (prepare_data source.calibration=dark)


def temporal_mean_image(movie: Any, window: int = 8, max_frames: int = 1024) -> np.ndarray:
    """Mean image ``[H, W]`` over the frames photon transfer samples (``window``-frame blocks spread over the movie)."""
    starts = _window_starts(int(movie.shape[0]), window, max_frames)
    if not starts:
        raise NoPhotonSignature(f"movie {tuple(movie.shape)}: needs >= {window} frames for a temporal-mean image")
    total = np.zeros(tuple(int(s) for s in movie.shape[1:]), dtype=np.float64)
    for s in starts:
        total += read_frames(movie, s, s + window).astype(np.float64).sum(axis=0)
    return total / (len(starts) * window)


def estimate_dark_calibration(movie_adu: Any, offset: float | None = None, dark_percentile: float = 1.0,
                              window: int = 8, box: int = 3, num_bins: int = 32, max_frames: int = 1024,
                              max_samples: int = 2_000_000, clip_sigma: float = 8.0, rounds: int = 4,
                              min_r2: float = POOR_FIT_R2, seed: int = 0) -> PhotonTransfer:
    """Offset from the darkest pixels (or the given ``offset``), gain from the photon-transfer slope through it.

    A calcium movie has no shutter-closed frames, so the dark level - the EMVA 1288 standard's dark signal
    ``mu_y.dark``, from which its photon-transfer method measures the gain as the slope of
    ``var_y - var_y.dark = K (mu_y - mu_y.dark)`` (EMVA Standard 1288, Release 4.0, 2021, sec. 6) - is taken from
    the pixels that receive the least light: the ``dark_percentile`` percentile of the temporal-mean image (vessels,
    unlabelled neuropil, the edge of the imaging window). It is an upper bound of the detector offset (those pixels
    still see some background) and absorbs the read noise into the line, like the x-intercept of
    :func:`estimate_photon_transfer`. With the offset fixed only the slope is fitted (weighted least squares through
    ``(offset, 0)`` on the same binned, sigma-clipped samples), which stays determined when the movie's levels span
    too narrow a range to fit an intercept. The fit must explain the binned variances (``R^2 >= min_r2``): on
    processed data, whose variance does not grow with the level, it fails instead of returning a gain.
    """
    m, v, _ = photon_transfer_samples(movie_adu, window=window, box=box, max_frames=max_frames,
                                      max_samples=max_samples, seed=seed)
    _check_sample_count(m, num_bins, movie_adu.shape)
    if offset is None:
        offset = float(np.percentile(temporal_mean_image(movie_adu, window, max_frames), dark_percentile))

    def through_offset(bm: np.ndarray, bv: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
        excess = bm - offset
        denominator = float((weights * excess**2).sum())
        slope = float((weights * excess * bv).sum()) / denominator if denominator > 0 else float("nan")
        return slope, -slope * offset

    keep, slope, intercept, (bm, bv, _, cnt) = _clipped_fit(m, v, through_offset, num_bins, window, clip_sigma,
                                                            rounds)
    r2 = _r2(bm, bv, slope, intercept)
    if not (np.isfinite(slope) and slope > 0 and r2 >= min_r2):
        raise NoPhotonSignature(f"movie {tuple(movie_adu.shape)}: variance does not grow with the level above the dark offset "
                        f"{offset:.4g} (slope {slope:.4g}, R^2 {r2:.2f}; expected a slope > 0 with R^2 >= {min_r2}): "
                        "no shot-noise signature")
    return PhotonTransfer(gain=float(slope), offset=float(offset), means=bm, variances=bv, r2=r2, method="dark_pixels",
                          num_samples=int(keep.sum()), rejected_fraction=float(1 - keep.mean()), counts=cnt)


# ---------------------------------------------------------------------------------------------------------
# raw units (prepare_data source.calibration=none)

# 1 / Phi^-1(3/4): the median absolute deviation times this estimates a Gaussian's std (Hampel 1974, JASA 69:383;
# Rousseeuw & Croux 1993, JASA 88:1273)
MAD_TO_STD = 1.4826


@dataclass
class RawScale:
    """Robust level, spread and pixel noise of a movie in its own units (no photon scale)."""

    center: float  # median of the sampled values
    scale: float  # MAD_TO_STD * median absolute deviation; the standard deviation where the MAD is 0
    noise_std: float | None  # temporal pixel noise (see estimate_raw_scale); None for a single frame
    low: float  # smallest and largest sampled value
    high: float
    num_frames: int  # frames sampled

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _subsample(values: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return values if values.size <= k else rng.choice(values, k, replace=False)


def estimate_raw_scale(movie: Any, window: int = 8, max_frames: int = 1024, max_values: int = 2_000_000,
                       seed: int = 0) -> RawScale:
    """Median, MAD-based scale and temporal noise of a ``[T, H, W]`` movie over sampled frames (any length).

    Frames are read in ``window``-frame blocks spread over the movie (all of them for a movie shorter than
    ``max_frames``). The noise is Donoho & Johnstone's MAD estimate on the finest Haar detail in time,
    ``median|x[t+1] - x[t]| / (sqrt(2) * 0.6745)`` (Biometrika 81:425, 1994): sparse calcium transients move the
    median little, and a temporally smoothed movie reports the (smaller) noise it still has.
    """
    num_frames = int(movie.shape[0])
    window = min(window, num_frames)
    starts = _window_starts(num_frames, window, max_frames)
    rng = np.random.default_rng(seed)
    per_window = max(1, max_values // len(starts))
    values, diffs = [], []
    low, high = math.inf, -math.inf
    for s in starts:
        x = read_frames(movie, s, s + window).astype(np.float64)
        if not np.isfinite(x).all():
            raise DataError(f"movie frames {s}:{s + window} contain NaN/Inf: expected finite intensities")
        low, high = min(low, float(x.min())), max(high, float(x.max()))
        values.append(_subsample(x.ravel(), per_window, rng))
        diffs.append(_subsample(np.diff(x, axis=0).ravel(), per_window, rng))
    sample = np.concatenate(values)
    center = float(np.median(sample))
    scale = MAD_TO_STD * float(np.median(np.abs(sample - center)))
    if not scale > 0:  # most values equal (e.g. a masked or clipped background): the spread of the rest
        scale = float(sample.std())
    if not scale > 0:
        raise DataError(f"movie {tuple(movie.shape)}: every sampled value is {center:.6g}; expected intensities that vary")
    steps = np.concatenate(diffs)
    noise = MAD_TO_STD * float(np.median(np.abs(steps))) / math.sqrt(2.0) if steps.size else None
    return RawScale(center=center, scale=scale, noise_std=noise, low=low, high=high,
                    num_frames=len(starts) * window)
