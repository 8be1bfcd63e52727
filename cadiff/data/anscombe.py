"""The generalized Anscombe transform of Poisson-Gaussian photons, its inverses and its exact moments.

``f(x) = 2 sqrt(x + 3/8 + r^2)`` makes shot noise ~N(0, 1) for bright pixels (Anscombe 1948; the generalized form
for Poisson + Gaussian read noise of std ``r`` photons, Starck, Murtagh & Bijaoui 1998).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from scipy.special import gammaln


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def anscombe(x_photons: Any, read_noise_photons: float = 0.0) -> Any:
    """Variance-stabilize Poisson-Gaussian photons (gain 1): ``2 * sqrt(max(x + 3/8 + sigma^2, 0))``."""
    shift = 0.375 + float(read_noise_photons) ** 2
    if _is_torch(x_photons):
        return 2.0 * (x_photons + shift).clamp_min(0.0).sqrt()
    return 2.0 * np.sqrt(np.maximum(np.asarray(x_photons) + shift, 0.0))


def inverse_anscombe(y: Any, read_noise_photons: float = 0.0) -> Any:
    """Algebraic (exact) inverse of :func:`anscombe` on its range: ``(y/2)^2 - 3/8 - sigma^2`` for ``y >= 0``.

    This is the exact inverse of the forward map (what round trips need), not the asymptotically unbiased
    inverse of Makitalo & Foi, which corrects E[f(x)] != f(E[x]) when denoising.
    """
    shift = 0.375 + float(read_noise_photons) ** 2
    if _is_torch(y):
        return (y.clamp_min(0.0) / 2.0) ** 2 - shift
    return (np.maximum(np.asarray(y), 0.0) / 2.0) ** 2 - shift


def anscombe_moments(levels_photons: np.ndarray, read_noise_photons: float = 0.0,
                     quadrature_points: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and std of :func:`anscombe` applied to Poisson(lambda) + N(0, r^2) photons, per ``lambda``.

    The generalized Anscombe transform makes shot noise N(0, 1) only for bright pixels; at a few photons per
    pixel (raw two-photon data) its std falls well below 1. The stage-1 decoder draws its noise around the
    predicted signal with these moments, so dark pixels get the (smaller) spread they really have. Computed by
    summing the Poisson pmf over counts and Gauss-Hermite quadrature over the read noise: deterministic.
    """
    levels = np.asarray(levels_photons, dtype=np.float64)
    nodes, weights = np.polynomial.hermite_e.hermegauss(quadrature_points)  # E[g(e)], e ~ N(0, 1)
    weights = weights / weights.sum()
    max_count = int(np.ceil(levels.max() + 12.0 * np.sqrt(levels.max() + 1.0) + 12.0))
    counts = np.arange(max_count + 1, dtype=np.float64)
    pmf = _poisson_pmf(counts[None, :], levels[:, None])  # [L, K]
    values = anscombe(counts[:, None] + float(read_noise_photons) * nodes[None, :], read_noise_photons)  # [K, Q]
    first = pmf @ (values @ weights)
    second = pmf @ ((values**2) @ weights)
    return first, np.sqrt(np.maximum(second - first**2, 0.0))


def _poisson_pmf(k: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Poisson pmf ``lam^k e^-lam / k!`` in log space (exact 1 at k = 0 for lam = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = k * np.log(lam) - lam - gammaln(k + 1.0)
    return np.where(lam > 0, np.exp(np.where(lam > 0, log_pmf, 0.0)), (k == 0).astype(np.float64))


@functools.lru_cache(maxsize=32)
def cached_anscombe_moments(levels: tuple[float, ...], read_noise_photons: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`anscombe_moments` of a fixed level grid, computed once per read noise (read-only arrays)."""
    mean, std = anscombe_moments(np.asarray(levels), read_noise_photons)
    mean.flags.writeable = std.flags.writeable = False
    return mean, std


_UNBIASED_LEVELS = np.concatenate([[0.0], np.geomspace(1e-3, 1e4, 255)])


def inverse_anscombe_unbiased(y: Any, read_noise_photons: float = 0.0) -> np.ndarray:
    """Photon level ``lambda`` whose *expected* Anscombe value is ``y``: the exact unbiased inverse.

    A denoiser trained in Anscombe space estimates ``E[f(x)]``, not ``f(E[x])``; at a few photons per pixel the
    algebraic inverse of such an estimate is biased low (Makitalo & Foi 2011, IEEE TIP 20(1), "Optimal
    inversion of the Anscombe transformation in low-count Poisson image denoising"). Inverts
    :func:`anscombe_moments` by interpolation; above 1e4 photons ``lambda = (y/2)^2 - 1/8 - r^2``.
    """
    mean, _ = cached_anscombe_moments(tuple(_UNBIASED_LEVELS), float(read_noise_photons))
    y = np.asarray(y, dtype=np.float64)
    out = np.interp(y, mean, _UNBIASED_LEVELS, left=0.0)
    high = y > mean[-1]
    out[high] = (y[high] / 2.0) ** 2 - 0.125 - float(read_noise_photons) ** 2
    return out
