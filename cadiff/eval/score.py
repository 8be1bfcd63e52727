"""One quality number per training run, comparable across what a sweep varies (lower is better).

``val_loss`` is not comparable across objectives (flow vs DDPM), time samplers or latent sizes: each trial is
scored by its own loss. These scores measure the model's output instead:

* stage 1 (autoencoder): ``|1 - gain_ratio| + latent_use``. ``gain_ratio`` is the median photon-transfer gain
  (variance per unit mean, :func:`cadiff.eval.metrics.photon_transfer`) of the reconstructions over that of
  their held-out inputs, both in photon units: 1 when the decoder reproduces the inputs' shot noise, < 1 when it
  smooths it away, > 1 when it adds noise. ``latent_use`` is the decoder's validation loss with each clip's own
  latent over the loss with another clip's (``validation_losses``): 1 for a decoder that ignores its latent,
  -> 0 as the latent explains the clip. Both terms are unit-free and 0 at best; a perfect model scores 0, a
  blind decoder with the right noise scores 1.
* stage 2 (latent DiT): the unbiased RBF-MMD^2 (Gretton et al. 2012, JMLR 13) between sampled and held-out
  latents, flattened, with the kernel bandwidth fixed by the held-out set alone (median heuristic), so every
  trial of a sweep over the same latents is measured with the same kernel. ~0 (it may be slightly negative)
  when the samples are distributed as the held-out latents.
"""

from __future__ import annotations

import math

import numpy as np

from cadiff.errors import DataError
from cadiff.eval.metrics import median_bandwidth, mmd2_unbiased, photon_transfer


def median_gain(clips: np.ndarray) -> float:
    """Median photon-transfer gain over photon-unit clips ``[N, T, H, W]``; NaN when no clip has a fit."""
    if not np.isfinite(clips).all():
        return math.nan
    gains = np.array([photon_transfer(c)["gain"] for c in clips], dtype=np.float64)
    gains = gains[np.isfinite(gains)]
    return float(np.median(gains)) if gains.size else math.nan


def reconstruction_score(inputs: np.ndarray, reconstructions: np.ndarray, latent_use: float) -> dict[str, float]:
    """Stage-1 score of photon-unit ``inputs`` and their ``reconstructions`` ``[N, T, H, W]``: see the module doc."""
    if inputs.shape != reconstructions.shape:
        raise DataError(f"reconstruction_score: inputs {inputs.shape} and reconstructions {reconstructions.shape} "
                        "differ, expected one reconstruction per input clip")
    input_gain = median_gain(inputs)
    if not input_gain > 0:
        raise DataError(f"reconstruction_score: the {len(inputs)} input clips have no positive photon-transfer gain "
                        f"({input_gain}), expected noisy photon-unit clips")
    # a diverged or blank decoder has no noise curve: it ranks last instead of failing the run
    ratio = median_gain(reconstructions) / input_gain
    score = abs(1.0 - ratio) + latent_use
    score = score if math.isfinite(score) else math.inf
    return {"score": score, "score_gain_ratio": ratio, "score_latent_use": latent_use}


def sample_mmd2(samples: np.ndarray, held_out: np.ndarray) -> dict[str, float]:
    """Stage-2 score: MMD^2 between ``samples`` and ``held_out`` ``[N, ...]`` (flattened), held-out bandwidth."""
    x = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
    y = np.asarray(held_out, dtype=np.float64).reshape(len(held_out), -1)
    if x.shape[1] != y.shape[1]:
        raise DataError(f"sample_mmd2: samples of {x.shape[1]} values and held-out of {y.shape[1]}, expected one shape")
    if not np.isfinite(y).all():
        raise DataError("sample_mmd2: non-finite values in the held-out latents, expected finite values")
    if not np.isfinite(x).all():
        return {"score": math.inf}  # a diverged model ranks last instead of failing the run
    return {"score": mmd2_unbiased(x, y, median_bandwidth(y))}
