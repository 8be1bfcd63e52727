"""Weights-free calcium-imaging metrics: noise (photon transfer), intensity, temporal, spatial and set-level MMD.

Every clip is a float array ``[T, H, W]`` in photon units (``(adu - offset) / gain`` with the clip's source
calibration), so a generator that reproduces shot noise has a photon-transfer gain of 1 on its own clips and
the gain ratio generated / reference is unit-free. No network weights are involved: the per-clip statistics
are closed-form and the set-level comparison is a kernel two-sample statistic over per-clip feature vectors.

Sets in raw units (data prepared with ``source.calibration=none``: the source's own units, no photon scale) get
every metric but the photon-transfer ones, which are reported as not applicable (``None`` with the reason).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cadiff.data.noise import estimate_photon_transfer
from cadiff.errors import DataError

log = logging.getLogger(__name__)

# Temporal and spatial spectra are summarized in this many contiguous frequency bands for the MMD features:
# enough to tell flat (white) noise from low-pass calcium dynamics, few enough for sets of a few dozen clips.
NUM_FEATURE_BANDS = 4
# Pixel values kept per set for the intensity histogram and W1 (an exact W1 on 1e5 values is milliseconds).
MAX_PIXELS = 100_000
# Random half splits of the reference set averaged for the MMD baseline.
BASELINE_SPLITS = 16
MIN_FRAMES, MIN_SIDE = 4, 3
UNITS = ("photons", "raw")
RAW_UNITS_REASON = ("not applicable: the data has no photon calibration (prepared with source.calibration=none), so "
                    "clips are in raw units and photon-transfer gain, offset and noise in photons are undefined")
NOISE_KEYS = ("gain_gen", "gain_ref", "gain_ratio", "offset_gen", "offset_ref", "offset_diff", "r2_gen", "r2_ref")
NO_PHOTON_TRANSFER = {"gain": math.nan, "offset": math.nan, "r2": math.nan, "means": np.zeros(0), "variances": np.zeros(0)}


# ---------------------------------------------------------------------------------------------------------
# per-clip statistics


def photon_transfer(clip: np.ndarray) -> dict[str, Any]:
    """Photon-transfer fit of one clip: gain (variance per unit mean), offset, R^2 and the binned points."""
    try:
        pt = estimate_photon_transfer(clip)
    except (DataError, ValueError) as exc:
        # a degenerate clip (e.g. constant) has no photon-transfer curve; it stays in the set with NaNs
        log.warning("photon transfer failed on a clip: %s", exc)
        return dict(NO_PHOTON_TRANSFER)
    return {
        "gain": float(pt.gain),
        "offset": float(pt.offset),
        "r2": float(pt.r2),
        "means": np.asarray(pt.means, dtype=np.float64),
        "variances": np.asarray(pt.variances, dtype=np.float64),
    }


def pixel_moments(clip: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, standard deviation, skewness and excess kurtosis of all pixel values of a clip."""
    x = np.asarray(clip, dtype=np.float64).ravel()
    mean = float(x.mean())
    centered = x - mean
    var = float(np.mean(centered**2))
    if var <= 0.0:
        # a point mass has no shape; 0 keeps a constant clip comparable instead of poisoning the set with NaN
        return mean, 0.0, 0.0, 0.0
    std = math.sqrt(var)
    skewness = float(np.mean(centered**3)) / std**3
    kurtosis = float(np.mean(centered**4)) / var**2 - 3.0
    return mean, std, skewness, kurtosis


def temporal_psd(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-averaged Hann-windowed periodogram along time: (frequencies in cycles/frame, power), DC dropped."""
    x = np.asarray(clip, dtype=np.float64)
    frames = x.shape[0]
    x = x - x.mean(axis=0, keepdims=True)
    window = np.hanning(frames + 2)[1:-1]  # no zero end points, so every frame contributes
    spectrum = np.fft.rfft(x * window[:, None, None], axis=0)
    power = np.mean(np.abs(spectrum) ** 2, axis=(1, 2)) / np.sum(window**2)
    return np.fft.rfftfreq(frames)[1:], power[1:]


def autocorrelation(clip: np.ndarray, max_lag: int) -> np.ndarray:
    """Pixel-averaged normalized temporal autocorrelation at lags 1..max_lag (clamped to T-1)."""
    x = np.asarray(clip, dtype=np.float64)
    frames = x.shape[0]
    lags = max(1, min(int(max_lag), frames - 1))
    x = x - x.mean(axis=0, keepdims=True)
    # zero-padding to 2T turns the circular FFT correlation into the linear one
    spectrum = np.fft.rfft(x, n=2 * frames, axis=0)
    acov = np.fft.irfft(np.abs(spectrum) ** 2, n=2 * frames, axis=0)[: lags + 1]
    energy = acov[0]
    valid = energy > 0
    if not valid.any():
        return np.zeros(lags)
    return (acov[1:, valid] / energy[valid]).mean(axis=1)


def local_correlation_image(clip: np.ndarray) -> np.ndarray:
    """Each pixel's mean Pearson correlation (over time) with its 8 neighbours; zero-variance pixels give 0.

    The correlation image of Smith & Hausser 2010 (Nat Neurosci 13:1144), as in CaImAn's ``local_correlations``.
    """
    x = np.asarray(clip, dtype=np.float64)
    _, height, width = x.shape
    x = x - x.mean(axis=0, keepdims=True)
    norm = np.sqrt(np.sum(x * x, axis=0))
    z = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    # correlation is symmetric: each of these 4 offsets credits both the pixel and its neighbour (8 in all)
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        here = (slice(0, height - dy), slice(max(0, -dx), width - max(0, dx)))
        there = (slice(dy, height), slice(max(0, dx), width - max(0, -dx)))
        r = np.einsum("thw,thw->hw", z[:, here[0], here[1]], z[:, there[0], there[1]])
        total[here] += r
        count[here] += 1
        total[there] += r
        count[there] += 1
    return total / np.maximum(count, 1)


def spatial_power_spectrum(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame-averaged, radially averaged 2D power spectrum: (radius in cycles/pixel, power), DC dropped."""
    x = np.asarray(clip, dtype=np.float64)
    _, height, width = x.shape
    x = x - x.mean(axis=(1, 2), keepdims=True)
    window = np.outer(np.hanning(height + 2)[1:-1], np.hanning(width + 2)[1:-1])
    power = np.mean(np.abs(np.fft.fft2(x * window)) ** 2, axis=0) / np.sum(window**2)
    side = min(height, width)
    radius = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :])
    ring = np.rint(radius * side).astype(np.int64)  # ring k holds |f| ~ k/side; every k <= side/2 is non-empty
    num_rings = side // 2
    keep = (ring >= 1) & (ring <= num_rings)
    sums = np.bincount(ring[keep] - 1, weights=power[keep], minlength=num_rings)
    counts = np.bincount(ring[keep] - 1, minlength=num_rings)
    return np.arange(1, num_rings + 1) / side, sums / np.maximum(counts, 1)


@dataclass
class ClipStats:
    """Every per-clip statistic, photon units; arrays are kept for figures and set-level curves."""

    gain: float
    offset: float
    r2: float
    pt_means: np.ndarray
    pt_variances: np.ndarray
    mean: float
    std: float
    skewness: float
    kurtosis: float
    temporal_freqs: np.ndarray
    temporal_psd: np.ndarray
    acf: np.ndarray
    corr_image: np.ndarray
    corr_median: float
    corr_p99: float
    spatial_freqs: np.ndarray
    spatial_psd: np.ndarray
    mean_image: np.ndarray


def check_clip(clip: np.ndarray, name: str = "clip") -> np.ndarray:
    """Return ``clip`` as float64 [T, H, W] or raise DataError naming it and the expected form."""
    x = np.asarray(clip)
    if x.ndim != 3 or x.shape[0] < MIN_FRAMES or min(x.shape[1:]) < MIN_SIDE:
        raise DataError(f"{name}: shape {x.shape}, expected [T>={MIN_FRAMES}, H>={MIN_SIDE}, W>={MIN_SIDE}]")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError(f"{name}: contains NaN or Inf values, expected finite photon counts")
    return x


def clip_stats(clip: np.ndarray, acf_lags: int = 10, units: str = "photons") -> ClipStats:
    """Compute every per-clip statistic of one clip [T, H, W] (photon transfer only for photon units)."""
    x = check_clip(clip)
    pt = photon_transfer(x) if units == "photons" else dict(NO_PHOTON_TRANSFER)
    mean, std, skewness, kurtosis = pixel_moments(x)
    t_freqs, t_psd = temporal_psd(x)
    s_freqs, s_psd = spatial_power_spectrum(x)
    corr = local_correlation_image(x)
    return ClipStats(
        gain=pt["gain"],
        offset=pt["offset"],
        r2=pt["r2"],
        pt_means=pt["means"],
        pt_variances=pt["variances"],
        mean=mean,
        std=std,
        skewness=skewness,
        kurtosis=kurtosis,
        temporal_freqs=t_freqs,
        temporal_psd=t_psd,
        acf=autocorrelation(x, acf_lags),
        corr_image=corr,
        corr_median=float(np.median(corr)),
        corr_p99=float(np.percentile(corr, 99)),
        spatial_freqs=s_freqs,
        spatial_psd=s_psd,
        mean_image=x.mean(axis=0),
    )


def _log10(x: np.ndarray | float) -> np.ndarray:
    # spectra of a constant clip are exactly 0; a floor keeps logs finite without moving real spectra
    return np.log10(np.maximum(x, 1e-12))


def _band_means(values: np.ndarray) -> list[float]:
    bands = np.array_split(values, min(NUM_FEATURE_BANDS, len(values)))
    return [float(b.mean()) for b in bands]


def clip_features(stats: ClipStats, units: str = "photons") -> dict[str, float]:
    """Per-clip feature vector (named) used for the set-level MMD; photon-transfer features for photon units only."""
    feats = {}
    if units == "photons":
        feats["log_gain"] = float(_log10(stats.gain)) if math.isfinite(stats.gain) else math.nan
        feats["offset"] = stats.offset
    feats.update({
        "log_mean": float(_log10(max(stats.mean, 0.0) + 1.0)),
        "log_std": float(_log10(stats.std + 1e-6)),
        "skewness": stats.skewness,
        "kurtosis": stats.kurtosis,
    })
    # lag 1 and the mean over lags: single far lags of a short clip are mostly estimation noise
    feats["acf_1"] = float(stats.acf[0])
    feats["acf_mean"] = float(np.mean(stats.acf))
    feats["corr_median"] = stats.corr_median
    feats["corr_p99"] = stats.corr_p99
    feats.update({f"log_tpsd_band{i}": v for i, v in enumerate(_band_means(_log10(stats.temporal_psd)))})
    feats.update({f"log_spsd_band{i}": v for i, v in enumerate(_band_means(_log10(stats.spatial_psd)))})
    return feats


# ---------------------------------------------------------------------------------------------------------
# set-level statistics


def wasserstein1(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 1-D Wasserstein-1 distance between two empirical distributions (area between their CDFs)."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise DataError("wasserstein1: empty sample, expected at least one value in each set")
    values = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, values[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, values[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(values)))


def pairwise_sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of x [m, d] and y [n, d]."""
    d2 = np.sum(x * x, axis=1)[:, None] + np.sum(y * y, axis=1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d2, 0.0)


def median_bandwidth(z: np.ndarray) -> float:
    """Median heuristic: the median pairwise distance of the pooled samples (Gretton et al. 2012, JMLR 13)."""
    n = z.shape[0]
    if n < 2:
        return 1.0
    d2 = pairwise_sq_dists(z, z)[np.triu_indices(n, k=1)]
    sigma = float(np.sqrt(np.median(d2)))
    return sigma if sigma > 0 else 1.0


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 with the RBF kernel exp(-|a-b|^2 / (2 s^2)) (Gretton et al. 2012, eq. 3); may be < 0."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise DataError(f"mmd2_unbiased: sets of {m} and {n} samples, expected at least 2 in each")
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = np.exp(-gamma * pairwise_sq_dists(x, x))
    kyy = np.exp(-gamma * pairwise_sq_dists(y, y))
    kxy = np.exp(-gamma * pairwise_sq_dists(x, y))
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def split_half_mmd2(ref: np.ndarray, bandwidth: float, rng: np.random.Generator, splits: int = BASELINE_SPLITS,
                    groups: Sequence[Any] | None = None) -> np.ndarray:
    """MMD^2 between two halves of the reference set: what a set of real clips scores against real clips.

    Without ``groups`` the halves are random halves of the clips. With ``groups`` (the recording each clip was cut
    from) every recording goes wholly to one half: clips of one movie share its cells and neuropil, so a clip
    split compares the same movies with themselves and scores ~0 even where two sets of real movies differ
    (measured on the ``two_photon`` simulator: -0.0006 by clips, 0.021 by movie, 4 vs 4 movies). Independent
    samples must be judged against the movie split; reconstructions of the reference's own clips (same movies)
    against the clip split. Every distinct balanced split is used when there are at most ``splits`` of them.
    """
    n = ref.shape[0]
    if n < 4:
        raise DataError(f"split_half_mmd2: {n} reference clips, expected at least 4 for two halves of 2")
    if groups is None:
        out = np.empty(splits)
        for i in range(splits):
            perm = rng.permutation(n)
            out[i] = mmd2_unbiased(ref[perm[: n // 2]], ref[perm[n // 2 :]], bandwidth)
        return out
    labels = np.asarray([str(g) for g in groups])
    if len(labels) != n:
        raise DataError(f"split_half_mmd2: {len(labels)} group labels for {n} reference clips, expected one per clip")
    names = sorted(set(labels))
    if len(names) < 2:
        raise DataError(f"split_half_mmd2: every reference clip is from recording {names[0]!r}, expected clips of at "
                        "least 2 recordings for a split by recording (or no groups for a split by clip)")
    halves = _group_halves(len(names), splits, rng)
    out = np.empty(len(halves))
    for i, half in enumerate(halves):
        inside = np.isin(labels, [names[k] for k in half])
        if min(inside.sum(), (~inside).sum()) < 2:
            raise DataError(f"split_half_mmd2: a split by recording leaves fewer than 2 clips in a half "
                            f"({int(inside.sum())} / {int((~inside).sum())}), expected >= 2 clips per recording")
        out[i] = mmd2_unbiased(ref[inside], ref[~inside], bandwidth)
    return out


def _group_halves(count: int, splits: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Up to ``splits`` distinct halves (``count // 2`` of ``count`` groups); every one of them if that few exist."""
    size = count // 2
    if math.comb(count, size) <= 2 * splits:
        # group 0 in the first half when the halves are the same size: a half and its complement are one split
        every = [h for h in itertools.combinations(range(count), size) if count % 2 or 0 in h]
        if len(every) <= splits:
            return every
        return [every[i] for i in sorted(rng.choice(len(every), size=splits, replace=False))]
    seen: set[tuple[int, ...]] = set()
    while len(seen) < splits:
        half = tuple(sorted(int(k) for k in rng.choice(count, size=size, replace=False)))
        if count % 2 == 0 and 0 not in half:
            half = tuple(k for k in range(count) if k not in half)
        seen.add(half)
    return sorted(seen)


@dataclass
class SetSummary:
    """Per-clip statistics of one set, its feature matrix and a pixel sample for histograms/W1."""

    stats: list[ClipStats]
    feature_names: list[str]
    features: np.ndarray  # [N, D]
    pixels: np.ndarray
    shape: tuple[int, int, int]
    units: str = "photons"  # photons | raw
    groups: list[str] | None = None  # the recording each clip was cut from (None: unknown, clips are the unit)

    def median(self, field: str) -> float:
        values = np.array([getattr(s, field) for s in self.stats], dtype=np.float64)
        values = values[np.isfinite(values)]
        return float(np.median(values)) if values.size else math.nan

    def mean_curve(self, field: str) -> np.ndarray:
        return np.mean(np.stack([getattr(s, field) for s in self.stats]), axis=0)


def summarize_set(clips: Sequence[np.ndarray], acf_lags: int = 10, seed: int = 0, name: str = "set",
                  units: str = "photons", groups: Sequence[Any] | None = None) -> SetSummary:
    """Per-clip statistics of a set of clips in ``units`` (photons | raw) that all share one shape [T, H, W];
    ``groups``: the recording each clip was cut from (the unit of the reference split-half, :func:`mmd_report`)."""
    if units not in UNITS:
        raise DataError(f"{name}: units {units!r}, expected one of {list(UNITS)}")
    if len(clips) == 0:
        raise DataError(f"{name}: no clips, expected at least one [T, H, W] clip")
    if groups is not None and len(groups) != len(clips):
        raise DataError(f"{name}: {len(groups)} recording labels for {len(clips)} clips, expected one per clip")
    shape = tuple(np.shape(clips[0]))
    for i, c in enumerate(clips):
        if tuple(np.shape(c)) != shape:
            raise DataError(f"{name}: clip {i} has shape {np.shape(c)}, expected the set's common shape {shape}")
    stats = [clip_stats(check_clip(c, f"{name} clip {i}"), acf_lags, units) for i, c in enumerate(clips)]
    rows = [clip_features(s, units) for s in stats]
    names = list(rows[0])
    features = np.array([[r[k] for k in names] for r in rows], dtype=np.float64)
    rng = np.random.default_rng(seed)
    per_clip = max(1, MAX_PIXELS // len(clips))
    pixels = np.concatenate([rng.choice(np.ravel(c), size=min(per_clip, np.size(c)), replace=False) for c in clips])
    return SetSummary(stats=stats, feature_names=names, features=features, pixels=pixels.astype(np.float64), shape=shape,
                      units=units, groups=None if groups is None else [str(g) for g in groups])


def _standardize(gen: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # pooled z-scores so no feature dominates the kernel by its units; NaNs (failed fits) sit at the pooled mean
    pooled = np.concatenate([gen, ref])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column that is NaN in both sets: handled below
        mean = np.nanmean(pooled, axis=0)
        std = np.nanstd(pooled, axis=0)
    mean = np.nan_to_num(mean)
    std = np.where(std > 1e-12, std, 1.0)  # NaN > x is False: an all-NaN column gets 1
    return np.nan_to_num((gen - mean) / std), np.nan_to_num((ref - mean) / std)


BASELINES = ("auto", "clip")


def mmd_report(gen: np.ndarray, ref: np.ndarray, seed: int = 0, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """RBF-MMD^2 between two feature sets plus the split-half baseline of the reference set, split by recording
    when ``groups`` names the recording of each reference clip and there are at least 2 (see
    :func:`split_half_mmd2`), else by clip (``baseline_unit`` says which)."""
    zg, zr = _standardize(gen, ref)
    bandwidth = median_bandwidth(np.concatenate([zg, zr]))
    out: dict[str, Any] = {"bandwidth": bandwidth, "num_gen": int(gen.shape[0]), "num_ref": int(ref.shape[0])}
    out["mmd2"] = mmd2_unbiased(zg, zr, bandwidth) if min(len(zg), len(zr)) >= 2 else None
    recordings = len(set(groups)) if groups is not None else 0
    unit = "recording" if recordings >= 2 else "clip"
    if groups is not None and recordings < 2:
        log.warning("the reference clips all come from one recording: its split-half MMD^2 splits clips, which share "
                    "that movie's cells, so it understates what two sets of real movies score")
    if len(zr) >= 4:
        rng = np.random.default_rng(seed)
        try:
            base = split_half_mmd2(zr, bandwidth, rng, groups=groups if unit == "recording" else None)
        except DataError as exc:  # a half of fewer than 2 clips (recordings of one clip each): split clips
            log.warning("reference split-half by recording impossible (%s); splitting clips instead", exc)
            unit, base = "clip", split_half_mmd2(zr, bandwidth, rng)
        out.update(baseline_mmd2=float(base.mean()), baseline_mmd2_std=float(base.std()), baseline_splits=len(base))
    else:
        out.update(baseline_mmd2=None, baseline_mmd2_std=None, baseline_splits=0)
    out.update(baseline_unit=unit, baseline_recordings=recordings or None)
    return out


def feature_shift(gen: np.ndarray, ref: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    """Per named feature, the shift of the generated set's mean from the reference set's in reference standard
    deviations (NaN values, failed fits, left out; ``None`` where a set has none or the reference is constant):
    which features an MMD^2 above the split-half sees."""
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        g, r = gen[:, j], ref[:, j]
        g, r = g[np.isfinite(g)], r[np.isfinite(r)]
        std = float(np.std(r)) if len(r) > 1 else 0.0
        out[name] = float((g.mean() - r.mean()) / std) if len(g) and std > 1e-12 else None
    return out


def log_psd_distance_db(psd_a: np.ndarray, psd_b: np.ndarray) -> float:
    """Root-mean-square difference of two power spectra in decibels."""
    diff_db = 10.0 * (_log10(psd_a) - _log10(psd_b))
    return float(np.sqrt(np.mean(diff_db**2)))


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def compare_sets(gen: SetSummary, ref: SetSummary, rate_hz: float | None = None, seed: int = 0,
                 baseline: str = "auto") -> dict[str, Any]:
    """Every set-level metric of generated vs reference clips as a JSON-ready dict (NaN becomes None).

    ``baseline``: ``auto`` splits the reference by recording where ``ref.groups`` knows them (the comparator of
    independently generated clips), ``clip`` by clip (the comparator of reconstructions of the reference's own
    clips, which share its movies).
    """
    if baseline not in BASELINES:
        raise DataError(f"compare_sets: baseline {baseline!r}, expected one of {list(BASELINES)}")
    if gen.shape != ref.shape:
        raise DataError(f"compare_sets: generated clips {gen.shape} and reference clips {ref.shape}, expected one shape")
    if gen.units != ref.units:
        raise DataError(f"compare_sets: generated clips in {gen.units} units, reference clips in {ref.units}; expected "
                        "one kind (prepare and sample both with the same source.calibration)")
    t_freqs = gen.stats[0].temporal_freqs
    tpsd_gen, tpsd_ref = gen.mean_curve("temporal_psd"), ref.mean_curve("temporal_psd")
    spsd_gen, spsd_ref = gen.mean_curve("spatial_psd"), ref.mean_curve("spatial_psd")
    acf_gen, acf_ref = gen.mean_curve("acf"), ref.mean_curve("acf")
    ref_std = float(np.std(ref.pixels))
    w1 = wasserstein1(gen.pixels, ref.pixels)
    out = {
        "clip_shape": list(gen.shape),
        "units": gen.units,
        "noise": noise_metrics(gen, ref),
        "intensity": {
            "mean_gen": gen.median("mean"),
            "mean_ref": ref.median("mean"),
            "w1": w1,
            "w1_rel": _ratio(w1, ref_std),
            "skewness_gen": gen.median("skewness"),
            "skewness_ref": ref.median("skewness"),
            "kurtosis_gen": gen.median("kurtosis"),
            "kurtosis_ref": ref.median("kurtosis"),
        },
        "temporal": {
            "psd_distance_db": log_psd_distance_db(tpsd_gen, tpsd_ref),
            "freqs_cycles_per_frame": t_freqs,
            "freqs_hz": t_freqs * rate_hz if rate_hz else None,
            "psd_gen": tpsd_gen,
            "psd_ref": tpsd_ref,
            "acf_lags": list(range(1, len(acf_ref) + 1)),
            "acf_gen": acf_gen,
            "acf_ref": acf_ref,
            "acf_mae": float(np.mean(np.abs(acf_gen - acf_ref))),
        },
        "spatial": {
            "corr_median_gen": gen.median("corr_median"),
            "corr_median_ref": ref.median("corr_median"),
            "corr_p99_gen": gen.median("corr_p99"),
            "corr_p99_ref": ref.median("corr_p99"),
            "psd_distance_db": log_psd_distance_db(spsd_gen, spsd_ref),
            "freqs_cycles_per_pixel": gen.stats[0].spatial_freqs,
            "psd_gen": spsd_gen,
            "psd_ref": spsd_ref,
        },
        "mmd": {**mmd_report(gen.features, ref.features, seed, ref.groups if baseline == "auto" else None),
                "feature_names": list(ref.feature_names),
                "feature_shift": feature_shift(gen.features, ref.features, ref.feature_names)},
    }
    return to_jsonable(out)


def noise_metrics(gen: SetSummary, ref: SetSummary) -> dict[str, Any]:
    """Photon-transfer gain, offset and fit quality of both sets; ``None`` with the reason in raw units."""
    if gen.units != "photons":
        return {**dict.fromkeys(NOISE_KEYS), "not_applicable": RAW_UNITS_REASON}
    gain_gen, gain_ref = gen.median("gain"), ref.median("gain")
    offset_gen, offset_ref = gen.median("offset"), ref.median("offset")
    values = (gain_gen, gain_ref, _ratio(gain_gen, gain_ref), offset_gen, offset_ref, offset_gen - offset_ref,
              gen.median("r2"), ref.median("r2"))
    return dict(zip(NOISE_KEYS, values))


def evaluate_sets(
    gen_clips: Sequence[np.ndarray],
    ref_clips: Sequence[np.ndarray],
    acf_lags: int = 10,
    rate_hz: float | None = None,
    seed: int = 0,
    units: str = "photons",
    ref_groups: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Summarize both sets of clips in ``units`` (one common shape) and compare them: the full metrics dict;
    ``ref_groups``: the recording of each reference clip (the split-half baseline then splits by recording)."""
    gen = summarize_set(gen_clips, acf_lags, seed, name="generated", units=units)
    ref = summarize_set(ref_clips, acf_lags, seed + 1, name="reference", units=units, groups=ref_groups)
    return compare_sets(gen, ref, rate_hz=rate_hz, seed=seed)


def to_jsonable(obj: Any) -> Any:
    """Arrays to lists, numpy scalars to Python, non-finite floats to None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
