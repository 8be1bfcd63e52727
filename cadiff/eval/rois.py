"""ROI detection (correlation image or mean image) and IoU matching, for judging mask-conditioned samples without
weights.

Detection (:func:`detect_rois`, ``method="correlation"``; the mean-image route is described there) follows the
seeded correlation-image recipe of CaImAn's greedy/corr-image initialisation (Smith & Hausser 2010, Nat Neurosci
13:1144; Pnevmatikakis et al. 2016, Neuron 89:285), kept to numpy/scipy:

1. remove each pixel's mean and regress out the frame-mean trace (slow neuropil/drift modulation shared by the
   whole field, which would otherwise correlate every pixel with its neighbours);
2. local correlation image ``C`` (:func:`cadiff.eval.metrics.local_correlation_image`);
3. foreground ``C > median(C) + z * sigma`` where ``sigma`` is the larger of the robust spread of ``C``
   (1.4826 MAD) and its null spread for white noise, ``1 / sqrt(8 T)``; so a pure-noise movie (and a movie
   with structure but no cells) gives no foreground beyond isolated specks;
4. seeds are local maxima of the smoothed ``C`` in the foreground; a watershed by priority flooding from the
   seeds (:func:`_flood`) splits touching cells;
5. each seed's footprint is the regression coefficient of every pixel of its basin on the seed's trace (the
   mean of the 3x3 pixels around it), so the footprint is linear in the cell's spatial profile; the ROI is the
   connected part around the seed where the footprint is at least ``footprint_fraction`` of its peak (the
   simulator's ground-truth ROIs are ``footprint >= 0.3``), kept if its size is in ``[min_size, max_size]``.

Matching (:func:`match_rois`) pairs predicted and true masks one-to-one by maximum total IoU (Hungarian) and
counts a pair as a hit at ``IoU >= iou`` (the Neurofinder / CaImAn convention uses 0.5).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from cadiff.errors import DataError
from cadiff.eval.metrics import check_clip, local_correlation_image

# Seed search: correlation image smoothed at 1 px, a seed is the maximum of its 5x5 neighbourhood; cells of a
# few pixels radius (simulator sigma 2.5-3 px) then give one seed each.
SEED_SMOOTH_PX = 1.0
SEED_WINDOW_PX = 5
# A pixel ring of 1 around the seed averages 9 pixels into its reference trace.
SEED_TRACE_RADIUS = 1
# Mean-image detector: the neuropil background is the mean image smoothed at about a cell's span (simulated ROIs
# span <= ~13 px: sigma 3 px, ellipticity 0.4, footprint >= 0.3 of peak) over the pixels not taken as cells.
# 6 px rather than 8 follows the neuropil closer on 32 px tiles; with MEAN_Z 3 instead of 4, two_photon 32x32
# tiles, 253 frames, three simulator seed sets of 16-32 movies (224-470 ROIs): F1 0.753 -> 0.840, 0.771 -> 0.814,
# 0.746 -> 0.801 (precision 0.93-0.95 in both; the recall is what grew), false ROIs on cell-free tiles 3 -> 2 in
# 64, 3 -> 2 in 64, 6 -> 5 in 128; on 17-frame tiles F1 0.628 -> 0.674, 0 false ROIs in 128 in both.
MEAN_BACKGROUND_PX = 6.0
MEAN_BACKGROUND_ITERATIONS = 3
# A seed must also stand out in the background-subtracted mean image smoothed closer to a cell's own size (a
# matched filter for sigma ~2.5-3 px cells), which keeps shot-noise specks of short, dim movies out.
MEAN_DETECT_PX = 2.0
# Mean-image seeds and basins: the negative Laplacian of Gaussian of the excess at a cell's scale, a blob detector
# (Lindeberg 1998, Int J Comput Vis 30:79) that gives two overlapping cells two peaks where the smoothed image has
# one (two sigma-2.5 px cells 6 px apart: one ROI from the smoothed mean image, two from the LoG; 4-5 px apart,
# one from either). two_photon 32x32 tiles of 16 movies (230 ROIs): F1 0.699 -> 0.734 at 253 frames, 0.598 ->
# 0.626 at 17 frames; false ROIs on cell-free tiles 23 -> 24 in 300 at 253 frames, 18 -> 22 in 1000 at 17 frames
# (within their Poisson spread). Sigma 1.5 found more ROIs, less precisely (F1 0.725 at 253 frames).
MEAN_SEED_LOG_PX = 2.0
# An ROI of the mean image is kept when its summed excess over the background stands this many null spreads
# above zero: a cell adds light over its whole footprint, a shot-noise peak of a short, dim movie does not
# (two_photon, 17-frame 32x32 cell-free tiles: 18 false ROIs in 32 tiles without this test, 1 with it, with the
# smoothed-contrast seeds of before; with the LoG seeds 16 without it, 3 with it).
MEAN_ROI_Z = 10.0
# Default seed thresholds (robust/null spreads): the correlation image's, and the mean image's, which can stand
# lower because MEAN_ROI_Z already rejects shot-noise peaks (the measurements at MEAN_BACKGROUND_PX).
CORRELATION_Z = 4.0
MEAN_Z = 3.0


def _remove_common_mode(movie: np.ndarray) -> np.ndarray:
    """Per-pixel mean removed, then the least-squares fit of the frame-mean trace subtracted pixel by pixel."""
    x = movie - movie.mean(axis=0, keepdims=True)
    common = x.mean(axis=(1, 2))
    energy = float(common @ common)
    if energy > 0:
        beta = np.einsum("thw,t->hw", x, common) / energy
        x = x - common[:, None, None] * beta[None]
    return x


def _foreground(corr: np.ndarray, frames: int, z: float) -> np.ndarray:
    """Pixels whose correlation stands ``z`` robust/null standard deviations above the image median."""
    median = float(np.median(corr))
    spread = max(1.4826 * float(np.median(np.abs(corr - median))), 1.0 / math.sqrt(8 * frames))
    return corr > median + z * spread


def _seed_basins(height: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeds: local maxima of ``height`` (the maximum of their :data:`SEED_WINDOW_PX` neighbourhood) in the
    foreground, as coordinates ``[K, 2]`` (highest first), and the watershed basin label of every pixel (0: none)."""
    peaks = foreground & (height == ndi.maximum_filter(height, size=SEED_WINDOW_PX))
    seeds = np.argwhere(peaks)
    seeds = seeds[np.argsort(-height[peaks], kind="stable")]
    return seeds, _flood(height, seeds)


def _flood(height: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Watershed by priority flooding from ``seeds`` down ``height`` (Meyer 1991): the highest unlabelled pixel
    next to a basin joins it, so each basin holds the slopes that fall away from its seed and basins meet on the
    valleys between seeds. Every pixel connected to a seed gets a label ``1..K`` (4-connectivity)."""
    labels = np.zeros(height.shape, dtype=np.int32)
    heap: list[tuple[float, int, int, int]] = []
    for k, (y, x) in enumerate(seeds, start=1):
        labels[y, x] = k
        heapq.heappush(heap, (-float(height[y, x]), k, int(y), int(x)))
    h, w = height.shape
    while heap:
        _, k, y, x = heapq.heappop(heap)
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and not labels[ny, nx]:
                labels[ny, nx] = k
                heapq.heappush(heap, (-float(height[ny, nx]), k, ny, nx))
    return labels


def _seed_roi(x: np.ndarray, seed: np.ndarray, region: np.ndarray, fraction: float) -> np.ndarray:
    """Connected pixels of ``region`` around ``seed`` whose regression on the seed trace is >= ``fraction`` x peak."""
    r = SEED_TRACE_RADIUS
    y0, x0 = seed
    trace = x[:, max(0, y0 - r): y0 + r + 1, max(0, x0 - r): x0 + r + 1].mean(axis=(1, 2))
    energy = float(trace @ trace)
    if energy <= 0:
        return np.zeros(region.shape, dtype=bool)
    weight = np.einsum("thw,t->hw", x, trace) / energy
    weight[~region] = 0.0
    peak = weight[max(0, y0 - r): y0 + r + 1, max(0, x0 - r): x0 + r + 1].max()
    if peak <= 0:
        return np.zeros(region.shape, dtype=bool)
    parts, _ = ndi.label(weight >= fraction * peak)
    label = parts[y0, x0]
    return parts == label if label else np.zeros(region.shape, dtype=bool)


def _noise_gain(shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Per pixel, the fraction of white noise's variance a Gaussian filter of ``sigma`` (mode ``reflect``) passes:
    the sum of its squared weights, ``1 / (4 pi sigma^2)`` inside the image and more near the edges, where the
    mirrored pixels count twice."""
    gains = []
    for n in shape:
        weights = ndi.gaussian_filter1d(np.eye(n), sigma, axis=0, mode="reflect")  # [output, input]
        gains.append((weights**2).sum(axis=1))
    return gains[0][:, None] * gains[1][None, :]


class _MeanImage(NamedTuple):
    """:func:`_mean_image_maps`' images, all ``[H, W]``."""

    contrast: np.ndarray  # mean image above the background, smoothed at SEED_SMOOTH_PX: ROI extents
    score: np.ndarray  # contrast above its median, in spreads (robust or null)
    coarse: np.ndarray  # the excess smoothed at MEAN_DETECT_PX above its median, in null spreads
    relative: np.ndarray  # contrast / background
    excess: np.ndarray  # unsmoothed mean image - background
    null_var: float  # variance of one pixel of the unsmoothed mean image for temporally independent frames


def _mean_image_maps(movie: np.ndarray) -> _MeanImage:
    """The background-subtracted mean image and the scores a seed and an ROI are judged by (:class:`_MeanImage`).

    The background is a normalized convolution (Gaussian of :data:`MEAN_BACKGROUND_PX`) of the mean image over the
    pixels not yet taken as foreground, refined :data:`MEAN_BACKGROUND_ITERATIONS` times, so bright cells do not
    raise their own background. A spread is the larger of the robust spread (1.4826 MAD) and the null spread of a
    mean of ``T`` temporally independent frames: ``sqrt(mean temporal variance / T)`` times the smoothing's noise
    gain at that pixel (:func:`_noise_gain`).
    """
    def score(image: np.ndarray, null: np.ndarray, robust: bool = True) -> np.ndarray:
        median = float(np.median(image))
        return (image - median) / np.maximum(1.4826 * float(np.median(np.abs(image - median))) if robust else 0.0,
                                             null)

    raw = movie.mean(axis=0, dtype=np.float64)
    null_var = float(movie.var(axis=0, dtype=np.float64).mean()) / movie.shape[0]
    null_fine, null_coarse = (np.sqrt(null_var * _noise_gain(raw.shape, s)) for s in (SEED_SMOOTH_PX, MEAN_DETECT_PX))
    mean = ndi.gaussian_filter(raw, SEED_SMOOTH_PX)
    keep = np.ones(mean.shape)
    for _ in range(MEAN_BACKGROUND_ITERATIONS):
        weight = ndi.gaussian_filter(keep, MEAN_BACKGROUND_PX, mode="reflect")
        background = np.divide(ndi.gaussian_filter(mean * keep, MEAN_BACKGROUND_PX, mode="reflect"), weight,
                               out=np.full(mean.shape, float(np.median(mean))), where=weight > 1e-3)
        contrast = mean - background
        keep = (score(contrast, null_fine) <= 2).astype(np.float64)
    excess = raw - background
    relative = np.divide(contrast, background, out=np.zeros_like(contrast), where=background > 0)
    return _MeanImage(contrast, score(contrast, null_fine),
                      score(ndi.gaussian_filter(excess, MEAN_DETECT_PX), null_coarse, robust=False), relative,
                      excess, null_var)


def _mean_image_rois(m: _MeanImage, z: float, fraction: float, min_contrast: float) -> list[np.ndarray]:
    """Seeds: local maxima of the excess' negative Laplacian of Gaussian (:data:`MEAN_SEED_LOG_PX`) where both
    scores stand above ``z`` and the contrast is at least ``min_contrast`` x the background there; each seed's ROI
    is the connected part of its watershed basin (flooded on the same map) where ``contrast`` is >= ``fraction`` x
    its value at the seed, kept if its summed excess stands
    :data:`MEAN_ROI_Z` null spreads above zero (a cell adds light over its whole footprint, a noise peak does not)."""
    seeds, basins = _seed_basins(-ndi.gaussian_laplace(m.excess, MEAN_SEED_LOG_PX), m.score > z)
    rois = []
    for k, (y0, x0) in enumerate(seeds, start=1):
        if m.coarse[y0, x0] <= z or m.relative[y0, x0] < min_contrast:
            continue
        region = (basins == k) & (m.contrast >= fraction * m.contrast[y0, x0])
        parts, _ = ndi.label(region)
        if not parts[y0, x0]:  # a seed at or below zero contrast (min_contrast=0 on a dark field): no ROI
            continue
        roi = parts == parts[y0, x0]
        if m.excess[roi].sum() >= MEAN_ROI_Z * math.sqrt(roi.sum() * m.null_var):
            rois.append(roi)
    return rois


DETECTORS = ("correlation", "mean")


def detect_rois(movie: np.ndarray, z: float | None = None, min_size: int = 12, max_size: int = 400,
                footprint_fraction: float = 0.3, method: str = "correlation", min_contrast: float = 0.75) -> np.ndarray:
    """ROIs of ``movie`` ``[T, H, W]`` as bool masks ``[N, H, W]`` (none: ``N=0``).

    ``z``: the seed threshold in spreads; ``None`` takes the method's default (:data:`CORRELATION_Z`,
    :data:`MEAN_Z`).
    ``method="correlation"``: from the local correlation image (cells that are active, module docstring).
    ``method="mean"``: from the mean image (cells brighter than their surround at rest, as GCaMP cells are - the
    anatomical route of suite2p's ``anatomical_only`` and CaImAn's mean-image initialisation): the neuropil
    background is removed (:func:`_mean_image_maps`), seeds are maxima of the excess' negative Laplacian of
    Gaussian at a cell's scale (overlapping cells get one each), a seed stands ``z`` spreads above the median (robust, or
    the shot-noise null of a ``T``-frame mean) and at least ``min_contrast`` x above the background under it
    (neuropil texture is not), and its ROI is the connected part of its watershed basin at >=
    ``footprint_fraction`` of the seed's contrast whose summed excess stands :data:`MEAN_ROI_Z` null spreads
    above zero (shot-noise peaks do not). The ratio needs a movie whose dark level is zero: photons, or ADU minus
    the detector offset. For dim, photon-starved data (the ``two_photon`` preset: 0.1-0.3 photons per pixel per
    frame) the correlation image of a short movie holds no detectable cell while the mean image does.
    """
    if z is None:
        z = MEAN_Z if method == "mean" else CORRELATION_Z
    if not (z > 0 and 0 < footprint_fraction < 1 and 1 <= min_size <= max_size and method in DETECTORS
            and min_contrast >= 0):
        raise DataError(f"detect_rois: z={z}, footprint_fraction={footprint_fraction}, min_size={min_size}, "
                        f"max_size={max_size}, method={method!r}, min_contrast={min_contrast}; expected z > 0, "
                        f"0 < footprint_fraction < 1, 1 <= min_size <= max_size, method one of {DETECTORS}, "
                        "min_contrast >= 0")
    clip = check_clip(movie, "detect_rois movie")
    if method == "mean":
        rois = _mean_image_rois(_mean_image_maps(clip), z, footprint_fraction, min_contrast)
        masks = [roi for roi in rois if min_size <= roi.sum() <= max_size]
        return np.stack(masks) if masks else np.zeros((0, *clip.shape[1:]), dtype=bool)
    x = _remove_common_mode(clip)
    corr = local_correlation_image(x)
    foreground = _foreground(corr, x.shape[0], z)
    seeds, basins = _seed_basins(ndi.gaussian_filter(corr, SEED_SMOOTH_PX), foreground)
    masks = []
    for k, seed in enumerate(seeds, start=1):
        roi = _seed_roi(x, seed, (basins == k) & foreground, footprint_fraction)
        if min_size <= roi.sum() <= max_size:
            masks.append(roi)
    return np.stack(masks) if masks else np.zeros((0, *corr.shape), dtype=bool)


def iou_matrix(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Intersection over union of every predicted mask ``[N, H, W]`` with every true mask ``[M, H, W]``: ``[N, M]``."""
    a = pred.reshape(len(pred), -1).astype(np.float64)
    b = true.reshape(len(true), -1).astype(np.float64)
    inter = a @ b.T
    union = a.sum(axis=1)[:, None] + b.sum(axis=1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _as_masks(masks: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 3 or m.dtype != bool:
        raise DataError(f"match_rois {name}: dtype {m.dtype} shape {m.shape}, expected bool masks [N, H, W]")
    return m


def match_rois(pred: np.ndarray, true: np.ndarray, iou: float = 0.5) -> dict[str, float | int]:
    """One-to-one IoU matching (Hungarian) of ``pred`` to ``true`` masks: precision, recall, f1, hits, n_pred, n_true."""
    pred, true = _as_masks(pred, "pred"), _as_masks(true, "true")
    if pred.shape[1:] != true.shape[1:]:
        raise DataError(f"match_rois: pred frame {pred.shape[1:]} != true frame {true.shape[1:]}, expected equal H, W")
    if not 0 < iou <= 1:
        raise DataError(f"match_rois iou={iou}: expected 0 < iou <= 1")
    hits = 0
    if len(pred) and len(true):
        overlap = iou_matrix(pred, true)
        rows, cols = linear_sum_assignment(overlap, maximize=True)
        hits = int((overlap[rows, cols] >= iou).sum())
    return _scores(hits, len(pred), len(true))


def _scores(hits: int, n_pred: int, n_true: int) -> dict[str, float | int]:
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "hits": int(hits), "n_pred": int(n_pred),
            "n_true": int(n_true)}


def pool_matches(results: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """:func:`match_rois` results of several movies pooled: precision, recall and F1 of the summed counts."""
    return _scores(*(sum(r[k] for r in results) for k in ("hits", "n_pred", "n_true")))


def roi_contrast(movie: np.ndarray, rois: np.ndarray) -> dict[str, float]:
    """Mean local correlation (per-pixel mean removed) inside the union of ``rois [N, H, W]`` and outside it, and
    their difference ``contrast``: does a movie's correlated activity sit where the cells are? Needs pixels on
    both sides."""
    union = _as_masks(rois, "rois").any(axis=0)
    x = check_clip(movie, "roi_contrast movie")
    if union.shape != x.shape[1:] or union.all() or not union.any():
        raise DataError(f"roi_contrast: ROI union of shape {union.shape} with {int(union.sum())} pixels, expected "
                        f"the movie's frame {x.shape[1:]} with pixels inside and outside the ROIs")
    corr = local_correlation_image(x - x.mean(axis=0, keepdims=True))
    c_in, c_out = float(corr[union].mean()), float(corr[~union].mean())
    return {"corr_inside": c_in, "corr_outside": c_out, "contrast": c_in - c_out}
