"""AE quality benchmark: does the diffusion autoencoder keep shot noise where the regression AE averages it away?

Protocol (issue 7, "Quality benchmark"). Two stage-1 models share everything but the decoder objective: the
same composed config (``experiment=ae_tiny`` plus overrides; ``model=diffae`` vs ``model=regression_ae``, L2),
the same initialization seed, the same optimizer (the project's AdamW + warmup-cosine LR + EMA) and the exact
same sequence of training batches (random crops with flips of simulated movies, photon units normalized by the
training set's mean/std). The project's ``train_step`` under strategy=single trains them (the loop's step
without Ray), so the comparison isolates the objective. Evaluation uses the EMA weights on held-out simulated
movies (other seeds), cut into non-overlapping clips; every reconstruction is mapped back to photon units.

Metrics per model (input = the held-out clip the model reconstructs):
- gain ratio: photon-transfer gain (:func:`cadiff.data.noise.estimate_photon_transfer`) of the reconstructions
  over that of the inputs. ``pooled`` fits one line through every clip's pixel-windows (clips stacked in time,
  windows never straddle two clips); ``per-clip`` is the median of per-clip ratios (``eval.metrics``), which
  is noisier on small clips and NaN where a clip shows no shot-noise signature (counted as failed fits);
- noise variance ratio: mean frame-to-frame noise variance (local mean removed, the photon-transfer samples)
  of the reconstructions over that of the inputs - the slope alone misses a constant excess of noise;
- correlation-image error: mean |C_recon - C_input| of the local correlation images (``eval.metrics``);
- trace correlation: per simulated neuron, Pearson r between the ROI-mean trace of the stitched reconstruction
  and the ground-truth calcium trace, averaged over neurons that spike in the held-out movie;
- MMD^2 of per-clip feature vectors to the inputs, with the inputs' split-half baseline (``eval.metrics``);
- RMSE to the simulator's clean flux (photons): the denoising view, which the regression AE is built to win.
Reference rows calibrate the metrics at this clip size: ``oracle denoiser`` (the clean flux itself, a perfect
conditional mean), ``oracle resample`` (clean flux + a fresh Poisson-Gaussian draw, a perfect generative
decoder) and ``ignores latent`` (each clip replaced by a real clip from another movie: perfect noise, no
information about the input - the gain ratio alone cannot tell it from a good decoder; trace r and RMSE can).
A sampler table reruns the DiffAE decoder with Euler / Heun / midpoint at NFE 5..50 on a subset, on each time grid
of ``table_grids`` (``uniform``, ``shift:S``, ``rho:R``: :func:`cadiff.diffusion.samplers.time_grid`). The default
decoder (mean head + analytic noise, no residual UNet) decodes in 0 NFE, so its table is flat; the table tells
samplers and grids apart for decoders that integrate (``--override model.decoder_form=flow``).

Goals (the stage-1 issue): gain ratio 0.95-1.05, noise variance ratio 0.90-1.10, trace r >= 0.95 x the
regression AE's, latent use <= 0.20, correlation-image error <= the regression AE's and <= 0.5 x another clip's,
denoised PSNR >= the regression AE's; real movies: gain ratio 0.9-1.1, correlation-image error <= regression.

The suite runs both simulator presets (``default``, ``two_photon``) with 3 seeds each and the two real movies of
``shared/data/real`` (skipped when absent; no ground truth, so gain, noise, correlation image and RMSE to the
input only), on 2 worker processes, and checks every stage-1 goal on the means over seeds (``verdict``).
``oracle Gaussian noise model`` (the clean flux with the decoder's own calibrated Gaussian noise) is the ceiling
of the default decoder's noise metrics.

    python benchmarks/ae_quality.py              # the suite: <= 45 min on 2 cores
    python benchmarks/ae_quality.py --ablation   # decoder variants, default preset, seed 0
    python benchmarks/ae_quality.py --override model.mean_head=upsampler --steps 2520 \
        --out benchmarks/results/ae_quality_upsampler   # the upsampling mean head in the UNet head's training time
    python benchmarks/ae_quality.py --override model.mean_head=upsampler --override model.num_res_blocks=0 \
        --override model.channel_mult=[1,1,1,1] --override model.dec_num_res_blocks=0 --steps 6000 \
        --out benchmarks/results/ae_quality_lean6000   # the model's default (at --steps 2520: ae_quality_lean)
    python benchmarks/ae_quality.py --quick      # ~1 min smoke run, written to outputs/benchmarks/ae_quality_quick/
    python benchmarks/ae_quality.py --presets default --seeds 0 --no-real --override model.decoder_form=flow \
        --table-samplers euler heun --table-nfe 4 6 8 10 --table-grids uniform shift:0.5 rho:2   # grids vs NFE

Results: ``benchmarks/results/ae_quality.json`` (top-level ``summary``), ``ae_quality.md``, ``ae_quality_real.md``
and ``ae_quality_<preset>_*.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cadiff.config import StrategyConfig, compose, dec_num_res_blocks_of, to_dict
from cadiff.data.anscombe import anscombe, anscombe_moments, inverse_anscombe, inverse_anscombe_unbiased
from cadiff.data.movie import read_frames, to_photons
from cadiff.data.noise import PhotonTransfer, estimate_photon_transfer
from cadiff.data.simulate import GroundTruth, simulate_movie
from cadiff.data.sources import open_movie
from cadiff.diffusion.samplers import parse_grid
from cadiff.errors import ConfigError, DataError
from cadiff.eval.metrics import evaluate_sets, local_correlation_image, photon_transfer, to_jsonable
from cadiff.io import atomic_path, write_json_atomic, write_text_atomic
from cadiff.models.autoencoder import PixelNoise
from cadiff.models.registry import build_model
from cadiff.train.ema import EMA
from cadiff.train.loop import TrainingModule
from cadiff.train.stage import derived_noise
from cadiff.train.step import train_step
from cadiff.train.strategies import build_strategy

log = logging.getLogger("ae_quality")

REPO = Path(__file__).resolve().parents[2]  # the checkout (cadiff is installed editable from it)
RESULTS = REPO / "benchmarks" / "results"
QUICK_OUT = REPO / "outputs" / "benchmarks" / "ae_quality_quick"
# The seed's thesis as stated in issue 7: a noise-faithful decoder keeps the gain, a regression decoder loses it.
DIFFAE_GAIN_BAND = (0.9, 1.1)
REGRESSION_GAIN_MAX = 0.7
# EDM2 power-function EMA (Karras et al. 2024, arXiv:2312.02696): gamma = 6.94 <=> sigma_rel = 0.10, i.e. the
# average covers the last ~10% of training whatever the run length - a short run keeps a useful average.
EMA_GAMMA = 6.94
# Photon-transfer window (frames): the estimator's default; pooled fits stack clips in multiples of it.
PT_WINDOW = 8
MODELS = {"diffae": "diffae", "regression": "regression_ae"}  # benchmark name -> Hydra `model=` group option
FLOW_EVALS_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2}  # NFE per step as cadiff.diffusion.samplers counts


@dataclass
class BenchConfig:
    """Sizes and knobs of one benchmark run (the defaults are the <= 15 min run on 2 shared cores)."""

    preset: str = "default"  # simulator preset (cadiff.data.simulate.PRESETS)
    clip_frames: int = 17
    # 16x16 crops: the nets are fully convolutional, and on 2 shared cores 16x16 buys ~3x the optimizer steps of
    # 32x32 in the same time - steps, not pixels, are what the DiffAE's latent pathway is short of here
    clip_side: int = 16
    movie_side: int = 64
    train_movies: int = 4
    train_frames: int = 200
    test_movies: int = 2
    test_clips_per_tile: int = 3  # consecutive clips per spatial tile: held-out movies have 3 * 17 frames
    experiment: str = "ae_tiny"
    # the stage-1 model ae_quality.md measured at 1400 steps: the UNet mean head, one residual block per level in a
    # widening encoder and in the decoder networks. The model's default since then: the upsampler head
    # (`--override model.mean_head=upsampler --steps 2520`: ae_quality_upsampler.md), then also no blocks per level
    # in a constant-width encoder and one per level in the upsampler (6000 steps: ae_quality_lean6000.md; the
    # module docstring has both commands). Later --overrides win
    model_overrides: list[str] = field(default_factory=lambda: [
        "model.recompute_elementwise=false", "model.mean_head=unet", "model.num_res_blocks=1",
        "model.channel_mult=[1,2,2,2]", "model.dec_num_res_blocks=1"])
    steps: int = 1400  # the whole suite (2 presets x 3 seeds + 2 real movies) within 45 min on 2 cores
    batch_size: int = 4
    warmup_steps: int = 10
    lr: float | None = None  # None: the experiment's trainer.lr
    ema_decay: float = 0.99
    recon_sampler: str = "heun"  # the stage-1 default sampler (AutoencoderConfig.diffusion); 10 steps = 20 NFE
    recon_steps: int = 10
    table_samplers: list[str] = field(default_factory=lambda: ["euler", "heun", "midpoint"])
    table_nfe: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    table_grids: list[str] = field(default_factory=lambda: ["uniform"])  # sampling time grids of the table
    table_clips: int = 16
    eval_batch: int = 16
    seed: int = 0
    threads: int = 1
    # the pipeline's defaults: Anscombe-normalized input (the noise the decoder draws is ~N(0, 1) at every
    # brightness) and the DiffAE's analytic noise term (model.noise_skip, high-pass form)
    normalization: str = "anscombe"  # anscombe | photon
    precision: str = "fp32"  # fp32 | bf16: training compute (evaluation always decodes in fp32)
    noise_skip: bool = True  # DiffAE velocity = analytic Gaussian term for the pixel noise + UNet (needs anscombe)


QUICK = {"train_movies": 2, "train_frames": 120, "test_movies": 1, "test_clips_per_tile": 2, "steps": 40,
         "recon_steps": 5, "table_nfe": [5, 10], "table_clips": 8}


# ---------------------------------------------------------------------------------------------------------
# data


@dataclass
class HeldOut:
    """One held-out simulated movie in photon units with its ground truth."""

    photons: np.ndarray  # [T, H, W] float32, (ADU - offset) / gain
    truth: GroundTruth | None  # None for real movies


@dataclass
class BenchData:
    """Training movies, held-out movies and the normalization ``x = (f(photons) - center) / scale``.

    ``f`` is the identity (``normalization="photon"``) or the generalized Anscombe transform (``"anscombe"``,
    the pipeline's ``normalization.kind=anscombe``), with ``center``/``scale`` measured in ``f``'s units.
    """

    train: list[np.ndarray]
    held_out: list[HeldOut]
    center: float
    scale: float
    rate_hz: float
    normalization: str = "photon"
    read_noise_photons: float = 0.0

    def _f(self, photons: np.ndarray) -> np.ndarray:
        if self.normalization == "anscombe":
            return anscombe(np.asarray(photons, dtype=np.float64), self.read_noise_photons)
        return np.asarray(photons)

    def to_model(self, photons: np.ndarray) -> np.ndarray:
        """Photon clips -> the models' normalized float32 input."""
        return ((self._f(photons) - self.center) / self.scale).astype(np.float32)

    def to_photons(self, x: np.ndarray, estimate: bool = False) -> np.ndarray:
        """Inverse of :meth:`to_model` (float64 photons); ``estimate``: ``x`` is a denoiser's ``E[f(x)]``, mapped
        back with the unbiased inverse (:func:`cadiff.data.noise.inverse_anscombe_unbiased`)."""
        f = np.asarray(x, dtype=np.float64) * self.scale + self.center
        if self.normalization != "anscombe":
            return f
        return (inverse_anscombe_unbiased if estimate else inverse_anscombe)(f, self.read_noise_photons)


def simulate_data(cfg: BenchConfig) -> BenchData:
    """Simulate training and held-out movies (disjoint seeds) and measure the normalization on training data."""
    if cfg.movie_side % cfg.clip_side:
        raise ConfigError(f"movie_side {cfg.movie_side}: expected a multiple of clip_side {cfg.clip_side}")
    if cfg.train_frames < cfg.clip_frames:
        raise ConfigError(f"train_frames {cfg.train_frames}: expected >= clip_frames {cfg.clip_frames}")
    if cfg.normalization not in ("photon", "anscombe"):
        raise ConfigError(f"normalization {cfg.normalization!r}: expected 'photon' or 'anscombe'")
    train, rate_hz, read_noise = [], 0.0, 0.0
    for i in range(cfg.train_movies):
        movie, _ = simulate_movie(cfg.preset, cfg.train_frames, cfg.movie_side, cfg.movie_side,
                                  seed=cfg.seed * 1000 + i, return_clean=False)
        train.append(to_photons(movie.data, movie.gain, movie.offset))
        rate_hz, read_noise = movie.rate_hz, float(movie.read_noise or 0.0) / float(movie.gain)
    held_out = []
    for i in range(cfg.test_movies):
        movie, truth = simulate_movie(cfg.preset, cfg.clip_frames * cfg.test_clips_per_tile, cfg.movie_side,
                                      cfg.movie_side, seed=cfg.seed * 1000 + 500 + i)
        held_out.append(HeldOut(to_photons(movie.data, movie.gain, movie.offset), truth))
    data = BenchData(train, held_out, 0.0, 1.0, rate_hz, cfg.normalization, read_noise)
    pixels = data._f(np.concatenate([m.ravel() for m in train]).astype(np.float64))
    data.center, data.scale = float(pixels.mean()), float(max(pixels.std(), 1e-6))
    return data


def train_batches(data: BenchData, cfg: BenchConfig) -> Iterator[torch.Tensor]:
    """``cfg.steps`` normalized batches ``[B, 1, T, H, W]`` of random crops and flips, fixed by ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    f, s = cfg.clip_frames, cfg.clip_side
    for _ in range(cfg.steps):
        clips = []
        for _ in range(cfg.batch_size):
            movie = data.train[rng.integers(len(data.train))]
            t0 = rng.integers(movie.shape[0] - f + 1)
            y0, x0 = rng.integers(movie.shape[1] - s + 1), rng.integers(movie.shape[2] - s + 1)
            clip = movie[t0:t0 + f, y0:y0 + s, x0:x0 + s]
            if rng.random() < 0.5:
                clip = clip[:, ::-1]
            if rng.random() < 0.5:
                clip = clip[:, :, ::-1]
            clips.append(clip)
        batch = data.to_model(np.stack(clips))
        yield torch.from_numpy(np.ascontiguousarray(batch[:, None]))


def tile_origins(shape: Sequence[int], frames: int, side: int) -> list[tuple[int, int, int]]:
    """Origins ``(t0, y0, x0)`` of the non-overlapping ``[frames, side, side]`` tiles covering a movie."""
    t, h, w = shape
    return [(t0, y0, x0) for t0 in range(0, t - frames + 1, frames) for y0 in range(0, h - side + 1, side)
            for x0 in range(0, w - side + 1, side)]


def cut_clips(movie: np.ndarray, origins: Sequence[tuple[int, int, int]], frames: int, side: int) -> np.ndarray:
    """Stack the tiles at ``origins`` into ``[N, frames, side, side]``."""
    return np.stack([movie[t0:t0 + frames, y0:y0 + side, x0:x0 + side] for t0, y0, x0 in origins])


def flips(clips: np.ndarray) -> np.ndarray:
    """``clips [N, T, H, W]`` with their vertical, horizontal and double flips (4N clips)."""
    return np.concatenate([clips, clips[:, :, ::-1], clips[:, :, :, ::-1], clips[:, :, ::-1, ::-1]])


@torch.no_grad()
def encode(ae: Any, clips: np.ndarray, data: BenchData, batch: int = 64) -> torch.Tensor:
    """Posterior-mean latents of photon ``clips [N, T, H, W]``."""
    return torch.cat([ae.encode(torch.from_numpy(data.to_model(np.ascontiguousarray(clips[i:i + batch])))[:, None])
                      for i in range(0, len(clips), batch)])


def stitch(clips: np.ndarray, origins: Sequence[tuple[int, int, int]], shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`cut_clips` for a full tiling: clips back into a ``shape`` movie."""
    out = np.zeros(shape, dtype=np.float32)
    _, f, s, _ = clips.shape
    for clip, (t0, y0, x0) in zip(clips, origins):
        out[t0:t0 + f, y0:y0 + s, x0:x0 + s] = clip
    return out


# ---------------------------------------------------------------------------------------------------------
# models


def model_config(kind: str, cfg: BenchConfig, data: BenchData) -> tuple[Any, dict[str, Any]]:
    """The composed ``train_ae`` job config for ``kind`` (``diffae`` or ``regression``) with the run's overrides,
    and its model config with the values the trainer derives from the data (``cadiff.train.stage``)."""
    overrides = [f"experiment={cfg.experiment}", f"model={MODELS[kind]}", *cfg.model_overrides,
                 f"trainer.max_steps={cfg.steps}", f"trainer.warmup_steps={cfg.warmup_steps}",
                 f"data.batch_size={cfg.batch_size}", f"ema.decay={cfg.ema_decay}", f"ema.warmup_power={EMA_GAMMA}"]
    if cfg.lr is not None:
        overrides.append(f"trainer.lr={cfg.lr}")
    if not cfg.noise_skip:
        overrides.append("model.noise_skip=false")
    if kind == "regression":
        # the baseline's head as deep as the DiffAE's: a null model.dec_num_res_blocks resolves by whether the model
        # has a decoder UNet besides its head (config.dec_num_res_blocks_of), which the regression AE never has
        diffae = compose("train_ae", [f"experiment={cfg.experiment}", f"model={MODELS['diffae']}",
                                      *cfg.model_overrides]).model
        overrides.append(f"model.dec_num_res_blocks={dec_num_res_blocks_of(diffae)}")
    job = compose("train_ae", overrides)
    # the trainer's noise model from the data index (train.stage): here the benchmark's own normalization
    norm = {"kind": cfg.normalization, "center": data.center, "scale": data.scale}
    model = to_dict(job.model)
    model.update(derived_noise(model, norm, Path("<benchmark>"), {"sim": {"gain": 1.0, "read_noise": data.read_noise_photons}}))
    return job, model


# keys only the DiffAE's decoder reads: the regression AE ignores them
DECODER_ONLY_KEYS = {"kind", "decoder_form", "residual_unet", "mean_loss_weight", "noise_model", "noise_std",
                     "noise_skip", "noise_highpass", "diffusion"}


def check_same_architecture(diffae: nn.Module, regression: nn.Module) -> None:
    """Raise ConfigError unless both models resolve to the same encoder/UNet config (decoder-only keys aside)."""
    a = {k: v for k, v in diffae.model_config.items() if k not in DECODER_ONLY_KEYS}
    b = {k: v for k, v in regression.model_config.items() if k not in DECODER_ONLY_KEYS}
    if a != b:
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ConfigError(f"model configs differ in {diff}: the benchmark compares decoder objectives, expected "
                          "identical encoder/UNet settings for diffae and regression")


def train_autoencoder(kind: str, data: BenchData, cfg: BenchConfig, log_every: int = 20) -> tuple[nn.Module, dict]:
    """Train one stage-1 model on the shared batch sequence; returns it with EMA weights (eval mode) and a log."""
    job, model_cfg = model_config(kind, cfg, data)
    torch.manual_seed(cfg.seed)  # same architecture + same seed -> identical initial weights for both models
    model = build_model(model_cfg)
    model.train()
    # the trainer's step (single process): its AdamW, LR schedule, clipping and mixed precision (trainer.precision)
    job.trainer.precision = cfg.precision
    strategy = build_strategy(StrategyConfig(name="single"), job.trainer, micro_batch_size=cfg.batch_size)
    strategy.setup(TrainingModule(model), torch.device("cpu"))
    ema = EMA(strategy.ema_tensors(), decay=float(job.ema.decay), warmup_power=job.ema.warmup_power)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step, batch in enumerate(train_batches(data, cfg)):
        losses.append(float(train_step(strategy, iter([batch]), step, ema=ema, generator=generator).loss))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log.info("%s step %d/%d loss %.4f (%.1f s)", kind, step + 1, cfg.steps, np.mean(losses[-log_every:]),
                     time.perf_counter() - start)
    ema.copy_to(strategy.ema_tensors())
    model.eval()
    seconds = time.perf_counter() - start
    info = {"kind": kind, "steps": cfg.steps, "seconds": seconds, "s_per_step": seconds / max(1, cfg.steps),
            "params": sum(p.numel() for p in model.parameters()), "loss": losses,
            "final_loss": float(np.mean(losses[-max(1, cfg.steps // 10):])), "lr": float(job.trainer.lr)}
    return model, info


def reconstruct_clips(model: nn.Module, clips: np.ndarray, data: BenchData, sampler: str | None = None,
                      num_steps: int | None = None, seed: int = 0, batch_size: int = 8, grid: str | None = None
                      ) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Reconstruct photon clips ``[N, T, H, W]``: (photon reconstructions, decoder NFE, photon signal estimates).

    The signal estimate is the model's ``denoise`` output (the DiffAE's mean head, the regression AE's output)
    mapped back with the unbiased inverse; None for a model without one.
    """
    generator = torch.Generator().manual_seed(seed)
    out, estimates, nfe = [], [], 1
    with torch.no_grad():
        for i in range(0, len(clips), batch_size):
            x = torch.from_numpy(data.to_model(clips[i:i + batch_size]))[:, None]
            z = model.encode(x)
            y = model.decode(z, sampler=sampler, num_steps=num_steps, generator=generator, grid=grid)
            out.append(data.to_photons(y[:, 0].double().numpy()))
            if model.has_signal_estimate:
                estimates.append(data.to_photons(model.denoise(z)[:, 0].double().numpy(), estimate=True))
            nfe = int(getattr(model, "last_nfe", 1))  # the regression decoder is one evaluation
    denoised = np.concatenate(estimates).astype(np.float32) if estimates else None
    return np.concatenate(out).astype(np.float32), nfe, denoised


# ---------------------------------------------------------------------------------------------------------
# metrics


def pooled_photon_transfer(clips: np.ndarray | Sequence[np.ndarray]) -> PhotonTransfer | None:
    """One photon-transfer fit over all clips, stacked in time in whole windows; None if no line fits."""
    frames = (np.shape(clips[0])[0] // PT_WINDOW) * PT_WINDOW
    if frames == 0:
        raise DataError(f"clips of {np.shape(clips[0])[0]} frames: expected >= {PT_WINDOW} for photon transfer")
    try:
        return estimate_photon_transfer(np.concatenate([np.asarray(c)[:frames] for c in clips]), window=PT_WINDOW,
                                        method="binned")
    except DataError as exc:
        log.warning("pooled photon transfer failed: %s", exc)
        return None


def clip_gains(clips: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Per-clip photon-transfer gains (NaN where the clip has no shot-noise signature)."""
    return np.array([photon_transfer(np.asarray(c, dtype=np.float64))["gain"] for c in clips])


def gain_metrics(recon: np.ndarray, inputs: np.ndarray, input_pt: PhotonTransfer | None = None,
                 input_gains: np.ndarray | None = None) -> dict[str, Any]:
    """Pooled and per-clip photon-transfer gain ratios of reconstructions over their inputs."""
    input_pt = input_pt or pooled_photon_transfer(inputs)
    input_gains = clip_gains(inputs) if input_gains is None else input_gains
    pt = pooled_photon_transfer(recon)
    gains = clip_gains(recon)
    ratios = gains / input_gains
    finite = np.isfinite(ratios)
    return {
        "gain_ratio": pt.gain / input_pt.gain if pt is not None and input_pt is not None else None,
        # the slope alone misses a constant excess (or lack) of noise: compare the noise level itself too
        "noise_var_ratio": float(np.mean(pt.variances) / np.mean(input_pt.variances))
        if pt is not None and input_pt is not None and pt.variances.size and input_pt.variances.size else None,
        "gain_recon": pt.gain if pt is not None else None,
        "gain_input": input_pt.gain if input_pt is not None else None,
        "gain_r2": pt.r2 if pt is not None else None,
        "gain_ratio_clip_median": float(np.median(ratios[finite])) if finite.any() else None,
        "gain_ratio_clip_iqr": [float(v) for v in np.percentile(ratios[finite], [25, 75])] if finite.any() else None,
        "gain_fit_failures": int((~finite).sum()),
    }


def corr_image_error(recon: np.ndarray, inputs: np.ndarray) -> dict[str, float]:
    """Mean absolute difference of local correlation images (recon vs input), and both images' medians."""
    errors, med_recon, med_input = [], [], []
    for r, x in zip(recon, inputs):
        cr, cx = local_correlation_image(r), local_correlation_image(x)
        errors.append(float(np.mean(np.abs(cr - cx))))
        med_recon.append(float(np.median(cr)))
        med_input.append(float(np.median(cx)))
    return {"corr_image_error": float(np.mean(errors)), "corr_median_recon": float(np.median(med_recon)),
            "corr_median_input": float(np.median(med_input))}


def trace_correlations(movie: np.ndarray, truth: GroundTruth) -> np.ndarray:
    """Pearson r of each neuron's ROI-mean trace in ``movie`` with its ground-truth trace (NaN: silent/no ROI)."""
    frames = movie.shape[0]
    out = np.full(len(truth.traces), np.nan)
    for n, (roi, trace) in enumerate(zip(truth.rois, truth.traces)):
        gt = trace[:frames].astype(np.float64)
        if not roi.any() or gt.std() == 0:
            continue
        signal = movie[:, roi].mean(axis=1).astype(np.float64)
        if signal.std() == 0:
            out[n] = 0.0  # a flat reconstruction carries no trace at all
            continue
        out[n] = float(np.corrcoef(signal, gt)[0, 1])
    return out


@dataclass
class EvalSet:
    """Held-out clips with their origins, clean flux and the inputs' cached photon-transfer fits."""

    inputs: np.ndarray  # [N, T, H, W] photons
    clean: np.ndarray | None  # [N, T, H, W] expected photon flux (None: a real movie)
    movie_index: list[int]
    origins: list[tuple[int, int, int]]
    input_pt: PhotonTransfer | None = None
    input_gains: np.ndarray | None = None

    def subset(self, indices: Sequence[int]) -> EvalSet:
        """The clips at ``indices`` (photon-transfer fits recomputed for the subset)."""
        idx = list(indices)
        sub = EvalSet(self.inputs[idx], None if self.clean is None else self.clean[idx], [self.movie_index[i] for i in idx],
                      [self.origins[i] for i in idx])
        return sub.fitted()

    def fitted(self) -> EvalSet:
        """Self with the inputs' pooled and per-clip photon-transfer fits computed once."""
        self.input_pt = pooled_photon_transfer(self.inputs)
        self.input_gains = clip_gains(self.inputs)
        return self


def held_out_clips(data: BenchData, cfg: BenchConfig) -> EvalSet:
    """All non-overlapping held-out clips (inputs and, for simulations, clean flux) with movie index and origin."""
    inputs, clean, index, origins = [], [], [], []
    for i, movie in enumerate(data.held_out):
        tiles = tile_origins(movie.photons.shape, cfg.clip_frames, cfg.clip_side)
        inputs.append(cut_clips(movie.photons, tiles, cfg.clip_frames, cfg.clip_side))
        if movie.truth is not None:
            clean.append(cut_clips(movie.truth.clean, tiles, cfg.clip_frames, cfg.clip_side))
        index += [i] * len(tiles)
        origins += tiles
    return EvalSet(np.concatenate(inputs), np.concatenate(clean) if clean else None, index, origins).fitted()


def evaluate_reconstruction(recon: np.ndarray, evalset: EvalSet, data: BenchData, seed: int = 0,
                            traces: bool = True, mmd: bool = True) -> dict[str, Any]:
    """Every benchmark metric of reconstructed photon clips against their inputs (see module docstring)."""
    out: dict[str, Any] = gain_metrics(recon, evalset.inputs, evalset.input_pt, evalset.input_gains)
    out.update(corr_image_error(recon, evalset.inputs))
    out["rmse_to_input"] = rmse(recon, evalset.inputs)
    out["rmse_to_clean"] = rmse(recon, evalset.clean) if evalset.clean is not None else None
    if traces and all(m.truth is not None for m in data.held_out):
        rs = []
        for i, movie in enumerate(data.held_out):
            mine = [k for k, m in enumerate(evalset.movie_index) if m == i]
            stitched = stitch(recon[mine], [evalset.origins[k] for k in mine], movie.photons.shape)
            rs.append(trace_correlations(stitched, movie.truth))
        r = np.concatenate(rs)
        out["trace_corr"] = float(np.nanmean(r)) if np.isfinite(r).any() else None
        out["trace_corr_neurons"] = int(np.isfinite(r).sum())
    if mmd:
        full = evaluate_sets(list(recon), list(evalset.inputs), rate_hz=data.rate_hz, seed=seed)
        out["mmd2"] = full["mmd"]["mmd2"]
        out["mmd2_baseline"] = full["mmd"]["baseline_mmd2"]
        out["mmd2_baseline_std"] = full["mmd"]["baseline_mmd2_std"]
        out["temporal_psd_distance_db"] = full["temporal"]["psd_distance_db"]
        out["spatial_psd_distance_db"] = full["spatial"]["psd_distance_db"]
    return out


def oracle_resample(clean: np.ndarray, data: BenchData, seed: int) -> np.ndarray:
    """A perfect generative decoder: a fresh Poisson-Gaussian draw of the clean flux, in photon units."""
    truth = data.held_out[0].truth
    rng = np.random.default_rng(seed)
    read_noise_photons = truth.read_noise / truth.gain
    return (rng.poisson(clean) + rng.normal(0.0, read_noise_photons, size=clean.shape)).astype(np.float32)


def oracle_gaussian(clean: np.ndarray, data: BenchData, seed: int) -> np.ndarray:
    """The DiffAE's noise model on a perfect mean: the clean flux with the decoder's calibrated Gaussian noise.

    The ceiling of any decoder that draws Gaussian noise around its signal estimate (``PixelNoise``): photon
    mean and variance exact, but no discrete photon counts - which photon-starved movies show.
    """
    level = torch.from_numpy(np.maximum(clean, 0.0).astype(np.float64))
    rng = np.random.default_rng(seed)
    if data.normalization == "anscombe":
        levels = np.concatenate([[0.0], np.geomspace(1e-3, 1e4, 400)])
        expected = np.interp(level.numpy(), levels, anscombe_moments(levels, data.read_noise_photons)[0])
        mu = torch.from_numpy(((expected - data.center) / data.scale).astype(np.float32))
        noise = PixelNoise("anscombe", data.center, data.scale, data.read_noise_photons)
    else:
        mu = torch.from_numpy(((level.numpy() - data.center) / data.scale).astype(np.float32))
        noise = PixelNoise("photon", data.center, data.scale, data.read_noise_photons)
    center, std = noise(mu)
    x = center.numpy() + std.numpy() * rng.standard_normal(clean.shape).astype(np.float32)
    return data.to_photons(x).astype(np.float32)


def unconditional_sample(evalset: EvalSet) -> np.ndarray:
    """A decoder that ignores the latent: each clip replaced by a real clip from another place (another movie if any).

    The clips are rolled by the first shift (half the set first: with equal movies that is another movie) that
    moves every clip to a different (movie, tile) - the same tile at another time would share the mean image.
    """
    n = len(evalset.inputs)
    places = [(m, y0, x0) for m, (_, y0, x0) in zip(evalset.movie_index, evalset.origins)]
    for shift in [*range(n // 2, n), *range(1, n // 2)]:
        if all(places[i] != places[(i - shift) % n] for i in range(n)):
            return np.roll(evalset.inputs, shift, axis=0)
    raise DataError(f"{n} held-out clips all from one place: expected clips from at least two tiles or movies")


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Solver steps whose NFE is closest to ``nfe`` (Heun and midpoint cost 2 evaluations per step)."""
    if sampler not in FLOW_EVALS_PER_STEP:
        raise ConfigError(f"sampler {sampler!r}: expected one of {sorted(FLOW_EVALS_PER_STEP)}")
    return max(1, int(math.ceil(nfe / FLOW_EVALS_PER_STEP[sampler])))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference in float64."""
    return float(np.sqrt(np.mean((np.asarray(a, dtype=np.float64) - b) ** 2)))


def psnr_db(estimate: np.ndarray, clean: np.ndarray) -> float:
    """PSNR of a signal estimate against the clean flux, peak = the clean flux's range over the set (dB)."""
    clean = np.asarray(clean, dtype=np.float64)
    peak = float(clean.max() - clean.min())
    return float(10.0 * np.log10(peak**2 / max(rmse(estimate, clean) ** 2, 1e-30)))


# the latent-use score needs another clip to be clearly worse than the oracle resample: below this relative gap
# (photon-starved clips, where shot noise dominates the RMSE) it cannot tell a reconstruction from another clip
LATENT_USE_MIN_GAP = 0.25


def latent_use(rmse_model: float, rmse_resample: float, rmse_other: float) -> float | None:
    """RMSE to the clean flux rescaled so 0 = oracle resample (everything but the noise draw), 1 = another clip.

    None where the scale is noise-dominated (another clip within ``LATENT_USE_MIN_GAP`` of the oracle resample).
    """
    if rmse_other - rmse_resample < LATENT_USE_MIN_GAP * rmse_resample:
        return None
    return (rmse_model - rmse_resample) / (rmse_other - rmse_resample)


def table_row(sampler: str, steps: int, nfe: int, s_per_clip: float | None, recon: np.ndarray,
              evalset: EvalSet, grid: str | None = None) -> dict[str, Any]:
    """One sampler-table row: noise, correlation-image and clean-flux metrics of ``recon`` on ``evalset``."""
    gains = gain_metrics(recon, evalset.inputs, evalset.input_pt, evalset.input_gains)
    return {"sampler": sampler, "grid": grid, "steps": steps, "nfe": nfe, "s_per_clip": s_per_clip,
            "gain_ratio": gains["gain_ratio"], "gain_ratio_clip_median": gains["gain_ratio_clip_median"],
            "noise_var_ratio": gains["noise_var_ratio"], **corr_image_error(recon, evalset.inputs),
            "rmse_to_clean": rmse(recon, evalset.clean) if evalset.clean is not None else None}


def sampler_table(model: nn.Module, evalset: EvalSet, data: BenchData, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Gain ratio and correlation-image error of the DiffAE decoder per sampler, time grid and NFE on ``evalset``
    (every row decodes from the same noise draw)."""
    rows = []
    for sampler in cfg.table_samplers:
        for grid in cfg.table_grids:
            for target in cfg.table_nfe:
                steps = steps_for_nfe(sampler, target)
                start = time.perf_counter()
                recon, nfe, _ = reconstruct_clips(model, evalset.inputs, data, sampler, steps, cfg.seed + 1,
                                                  cfg.eval_batch, grid)
                row = table_row(sampler, steps, nfe, (time.perf_counter() - start) / len(recon), recon, evalset, grid)
                log.info("sampler %s grid %s NFE %d: gain ratio %s, corr-image error %.4f", sampler, grid, nfe,
                         _fmt(row["gain_ratio"]), row["corr_image_error"])
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# the run


HEADLINE_KEYS = ("gain_ratio", "noise_var_ratio", "trace_r", "trace_r_regression", "latent_use", "corr_err",
                 "corr_err_regression", "corr_err_other_clip", "psnr_denoised_db", "psnr_regression_db")
REAL_KEYS = ("gain_ratio", "noise_var_ratio", "corr_err", "corr_err_regression")
# the stage-1 goals (issue "Stage 1 must reconstruct its input"), checked on the means over seeds
GOALS = {"gain_band": (0.95, 1.05), "noise_var_band": (0.90, 1.10), "trace_r_fraction": 0.95, "latent_use_max": 0.20,
         "corr_err_other_clip_fraction": 0.5, "real_gain_band": (0.9, 1.1)}


def headline(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The summary metrics of one simulated run (DiffAE unless named ``*_regression``)."""
    d, r = results["diffae"], results["regression"]
    return {"gain_ratio": d["gain_ratio"], "noise_var_ratio": d["noise_var_ratio"], "trace_r": d.get("trace_corr"),
            "trace_r_regression": r.get("trace_corr"), "latent_use": d.get("latent_use"),
            "corr_err": d["corr_image_error"], "corr_err_regression": r["corr_image_error"],
            "corr_err_other_clip": results["unconditional"]["corr_image_error"],
            "psnr_denoised_db": d.get("psnr_denoised_db"), "psnr_regression_db": r.get("psnr_denoised_db")}


def references(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """What a perfect noise-carrying decoder scores (the oracle resample), to judge whether a goal is reachable."""
    o = results["oracle_resample"]
    return {"trace_r_oracle": o.get("trace_corr"), "corr_err_oracle": o["corr_image_error"],
            "rmse_oracle": o["rmse_to_clean"], "rmse_other_clip": results["unconditional"]["rmse_to_clean"]}


def real_headline(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The summary metrics of one real movie (no ground truth)."""
    d, r = results["diffae"], results["regression"]
    return {"gain_ratio": d["gain_ratio"], "noise_var_ratio": d["noise_var_ratio"], "corr_err": d["corr_image_error"],
            "corr_err_regression": r["corr_image_error"], "rmse_to_input": d["rmse_to_input"],
            "rmse_to_input_regression": r["rmse_to_input"],
            "rmse_other_clip": results["unconditional"]["rmse_to_input"]}


def aggregate(rows: Sequence[dict[str, float | None]], keys: Sequence[str]) -> dict[str, float | None]:
    """Mean over seeds of each key, and ``<key>_spread`` = max - min (None where any seed has no value)."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        ok = all(v is not None and math.isfinite(v) for v in values) and values
        out[key] = float(np.mean(values)) if ok else None
        out[f"{key}_spread"] = float(np.max(values) - np.min(values)) if ok else None
    return out


def _within(value: float | None, band: tuple[float, float]) -> bool:
    return value is not None and band[0] <= value <= band[1]


def _at_most(value: float | None, bound: float | None) -> bool:
    return value is not None and bound is not None and value <= bound


def verdict(summary: dict[str, Any], refs: dict[str, dict[str, float | None]] | None = None) -> dict[str, Any]:
    """Every goal, per preset and per real movie, from the summary means: each goal's pass/fail and the total.

    ``refs`` (the oracle resample's means per preset) adds ``notes``: goals that no noise-carrying decoder can meet
    at that photon level (the oracle misses them too) and metrics that are noise-dominated there. Such a goal
    still counts as not met: the verdict never calls an unmeasured goal met.
    """
    goals: dict[str, dict[str, bool]] = {}
    notes: dict[str, dict[str, str]] = {}
    for preset, m in summary.items():
        if preset == "real":
            continue
        trace_bound = None if m["trace_r_regression"] is None else GOALS["trace_r_fraction"] * m["trace_r_regression"]
        other = m["corr_err_other_clip"]
        ref = (refs or {}).get(preset) or {}
        note = notes.setdefault(preset, {})
        if ref.get("trace_r_oracle") is not None and trace_bound is not None and ref["trace_r_oracle"] < trace_bound:
            note["trace_r"] = (f"unreachable with fresh shot noise: the oracle resample (clean flux + a new noise draw) "
                               f"reaches {ref['trace_r_oracle']:.3f} < {trace_bound:.3f}")
        if m["latent_use"] is None:
            note["latent_use"] = "not measurable: another clip is within 25% of the oracle resample's RMSE (noise-dominated)"
        if ref.get("corr_err_oracle") is not None and other is not None \
                and ref["corr_err_oracle"] > GOALS["corr_err_other_clip_fraction"] * other:
            note["corr_err_vs_other_clip"] = (f"unreachable: the oracle resample's error {ref['corr_err_oracle']:.3f} "
                                              f"is above 0.5 x another clip's ({other:.3f}): the correlation image "
                                              "is noise-dominated")
        goals[preset] = {
            "gain_ratio": _within(m["gain_ratio"], GOALS["gain_band"]),
            "noise_var_ratio": _within(m["noise_var_ratio"], GOALS["noise_var_band"]),
            "trace_r": m["trace_r"] is not None and trace_bound is not None and m["trace_r"] >= trace_bound,
            "latent_use": _at_most(m["latent_use"], GOALS["latent_use_max"]),
            "corr_err_vs_regression": _at_most(m["corr_err"], m["corr_err_regression"]),
            "corr_err_vs_other_clip": _at_most(m["corr_err"], None if other is None
                                               else GOALS["corr_err_other_clip_fraction"] * other),
            "psnr_denoised": m["psnr_denoised_db"] is not None and m["psnr_regression_db"] is not None
            and m["psnr_denoised_db"] >= m["psnr_regression_db"],
        }
    for movie, m in (summary.get("real") or {}).items():
        goals[f"real:{movie}"] = {"gain_ratio": _within(m["gain_ratio"], GOALS["real_gain_band"]),
                                  "corr_err_vs_regression": _at_most(m["corr_err"], m["corr_err_regression"])}
    return {"goals": goals, "all_met": bool(goals) and all(all(g.values()) for g in goals.values()),
            "notes": {k: v for k, v in notes.items() if v}, "thresholds": GOALS}


def suite_verdict(suite: dict[str, Any]) -> dict[str, Any]:
    """Recompute the runs' headlines, the summary and the verdict of a suite from its stored per-run results."""
    for rs in suite["runs"].values():
        for r in rs:
            res = r["results"]
            for kind in MODELS:
                res[kind]["latent_use"] = latent_use(res[kind]["rmse_to_clean"], res["oracle_resample"]["rmse_to_clean"],
                                                     res["unconditional"]["rmse_to_clean"])
            r["headline"], r["references"] = headline(res), references(res)
    summary: dict[str, Any] = {p: aggregate([r["headline"] for r in rs], HEADLINE_KEYS) for p, rs in suite["runs"].items()}
    summary["real"] = {m: {k: r["headline"][k] for k in REAL_KEYS} for m, r in suite["real"].items()}
    refs = {p: aggregate([r["references"] for r in rs], ("trace_r_oracle", "corr_err_oracle", "rmse_oracle",
                                                          "rmse_other_clip")) for p, rs in suite["runs"].items()}
    suite.update(summary=summary, references=refs, verdict=verdict(summary, refs))
    return suite


def train_and_evaluate(data: BenchData, evalset: EvalSet, cfg: BenchConfig, timings: dict[str, float]
                       ) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Train both models on the shared batches and evaluate them, another clip and the input on ``evalset``."""
    models, training = {}, {}
    for kind in MODELS:
        models[kind], training[kind] = train_autoencoder(kind, data, cfg)
    check_same_architecture(models["diffae"], models["regression"])
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    recons: dict[str, np.ndarray] = {}
    for kind, model in models.items():
        recons[kind], nfe, denoised = reconstruct_clips(model, evalset.inputs, data, cfg.recon_sampler,
                                                        cfg.recon_steps, cfg.seed + 1, cfg.eval_batch)
        results[kind] = {"nfe": nfe, **evaluate_reconstruction(recons[kind], evalset, data, cfg.seed),
                         "denoised": denoised}
        log.info("%s: %s", kind, {k: _fmt(v) for k, v in results[kind].items() if k != "denoised"})
    recons["unconditional"] = unconditional_sample(evalset)
    recons["input"] = evalset.inputs
    for name in ("unconditional", "input"):
        results[name] = {"nfe": None, **evaluate_reconstruction(recons[name], evalset, data, cfg.seed)}
    timings["evaluate_s"] = time.perf_counter() - t0
    return models, training, results, recons


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Simulate, train both models, evaluate them and the sampler table; returns the JSON-ready results."""
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = simulate_data(cfg)
    evalset = held_out_clips(data, cfg)
    timings["simulate_s"] = time.perf_counter() - start
    log.info("data: %d training movies %s, %d held-out clips, center %.2f scale %.2f photons", len(data.train),
             data.train[0].shape, len(evalset.inputs), data.center, data.scale)

    models, training, results, recons = train_and_evaluate(data, evalset, cfg, timings)
    recons["oracle_denoiser"] = evalset.clean.astype(np.float32)
    recons["oracle_resample"] = oracle_resample(evalset.clean, data, cfg.seed + 2)
    recons["oracle_gaussian"] = oracle_gaussian(evalset.clean, data, cfg.seed + 3)
    for name in ("oracle_denoiser", "oracle_resample", "oracle_gaussian"):
        results[name] = {"nfe": None, **evaluate_reconstruction(recons[name], evalset, data, cfg.seed)}
    for kind in MODELS:
        results[kind]["latent_use"] = latent_use(results[kind]["rmse_to_clean"], results["oracle_resample"]["rmse_to_clean"],
                                                 results["unconditional"]["rmse_to_clean"])
        if results[kind].get("denoised") is not None:
            results[kind]["psnr_denoised_db"] = psnr_db(results[kind].pop("denoised"), evalset.clean)

    t0 = time.perf_counter()
    table: list[dict[str, Any]] = []
    table_clips = 0
    if cfg.table_clips > 0:
        # evenly spread over both movies and all tiles: the table sees the same kind of content as the main rows
        table_idx = np.unique(np.linspace(0, len(evalset.inputs) - 1, min(cfg.table_clips, len(evalset.inputs))).round())
        table_set = evalset.subset([int(i) for i in table_idx])
        table_clips = len(table_set.inputs)
        table = sampler_table(models["diffae"], table_set, data, cfg)
        reg_recon, _, _ = reconstruct_clips(models["regression"], table_set.inputs, data, batch_size=cfg.eval_batch)
        table.append(table_row("regression (L2)", 1, 1, None, reg_recon, table_set))
    timings["sampler_table_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start

    out = {
        "benchmark": "ae_quality",
        "config": dataclasses.asdict(cfg),
        "model_config": models["diffae"].model_config,
        "host": {"node": platform.node(), "cpus": _cpu_count(), "torch": torch.__version__,
                 "threads": torch.get_num_threads()},
        "data": {"center_photons": data.center, "scale_photons": data.scale, "rate_hz": data.rate_hz,
                 "held_out_clips": len(evalset.inputs), "table_clips": table_clips,
                 "clip_shape": [cfg.clip_frames, cfg.clip_side, cfg.clip_side],
                 "neurons_held_out": int(sum(len(m.truth.traces) for m in data.held_out))},
        "training": training,
        "results": results,
        "sampler_table": table,
        "headline": headline(results),
        "timings": timings,
    }
    out["_figures"] = {"recons": recons, "evalset": evalset, "data": data}
    return out


# ---------------------------------------------------------------------------------------------------------
# real movies and the suite

REAL_DIR = Path(os.environ.get("CADIFF_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
# the real movies of shared/data/real (its README): name -> (path below REAL_DIR, HDF5 dataset key)
REAL_MOVIES = {"thunder_mouse": ("thunder_mouse", None), "allen_792757260": ("792757260_test_data.h5", "input_frames")}
REAL_TRAIN_FRACTION = 0.7  # first 70% of the frames train, the rest is held out


def real_data(cfg: BenchConfig, name: str, root: Path = REAL_DIR) -> tuple[BenchData, dict[str, Any]]:
    """A real movie calibrated by photon transfer, split in time into training frames and held-out frames."""
    rel, key = REAL_MOVIES[name]
    movie = open_movie(root / rel, key=key)
    adu = read_frames(movie.data, 0, movie.data.shape[0]).astype(np.float64)
    pt = estimate_photon_transfer(adu)
    photons = ((adu - pt.offset) / pt.gain).astype(np.float32)
    split = int(REAL_TRAIN_FRACTION * len(photons))
    if split < cfg.clip_frames or len(photons) - split < cfg.clip_frames:
        raise DataError(f"real movie {name}: {len(photons)} frames, expected >= {cfg.clip_frames / 0.3:.0f}")
    read_noise = float(pt.read_noise or 0.0) / pt.gain
    data = BenchData([photons[:split]], [HeldOut(photons[split:], None)], 0.0, 1.0, float(movie.rate_hz),
                     cfg.normalization, read_noise)
    f = data._f(photons[:split].astype(np.float64))
    data.center, data.scale = float(f.mean()), float(max(f.std(), 1e-6))
    return data, {"shape": list(adu.shape), "photon_transfer": pt.as_dict(), "train_frames": split,
                  "mean_photons": float(photons.mean())}


def run_real(cfg: BenchConfig, name: str) -> dict[str, Any]:
    """The DiffAE / regression comparison on one real movie: metrics that need no ground truth."""
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data, info = real_data(cfg, name)
    evalset = held_out_clips(data, cfg)
    _, training, results, _ = train_and_evaluate(data, evalset, cfg, timings)
    for kind in MODELS:
        results[kind].pop("denoised", None)
    timings["total_s"] = time.perf_counter() - start
    for info_kind in training.values():
        info_kind.pop("loss", None)
    return {"movie": name, "data": {**info, "held_out_clips": len(evalset.inputs)}, "training": training,
            "results": results, "headline": real_headline(results), "timings": timings}


def _job(args: tuple[str, str, BenchConfig]) -> tuple[str, str, dict[str, Any]]:
    """One suite job in a worker process: ``("sim", preset, cfg)`` or ``("real", movie, cfg)``."""
    kind, name, cfg = args
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name}/{cfg.seed}: %(message)s", datefmt="%H:%M:%S",
                        force=True)  # a pool worker runs several jobs: name each one
    logging.getLogger("cadiff.eval.metrics").setLevel(logging.ERROR)
    return kind, name, (run(cfg) if kind == "sim" else run_real(cfg, name))


def suite_jobs(cfg: BenchConfig, presets: Sequence[str], seeds: Sequence[int], real: bool
               ) -> list[tuple[str, str, BenchConfig]]:
    """Every run of the suite: presets x seeds (the sampler table with the first seed only) and the real movies."""
    jobs = []
    for preset in presets:
        for i, seed in enumerate(seeds):
            jobs.append(("sim", preset, dataclasses.replace(cfg, preset=preset, seed=seed,
                                                             table_clips=cfg.table_clips if i == 0 else 0)))
    if real:
        present = [name for name, (rel, _) in REAL_MOVIES.items() if (REAL_DIR / rel).exists()]
        if not present:
            log.warning("%s not present: the real-movie comparison is skipped", REAL_DIR)
        jobs += [("real", name, dataclasses.replace(cfg, seed=seeds[0], table_clips=0)) for name in present]
    return jobs


def run_suite(cfg: BenchConfig, presets: Sequence[str], seeds: Sequence[int], real: bool, workers: int
              ) -> dict[str, Any]:
    """All jobs on ``workers`` processes (one torch thread each); per-preset runs, real movies, summary, verdict."""
    start = time.perf_counter()
    jobs = suite_jobs(cfg, presets, seeds, real)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in presets}
    real_runs: dict[str, dict[str, Any]] = {}
    if workers <= 1:
        done = [_job(job) for job in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            done = list(pool.map(_job, jobs))
    for kind, name, res in done:
        (runs[name].append(res) if kind == "sim" else real_runs.__setitem__(name, res))
    return suite_verdict({"benchmark": "ae_quality", "config": dataclasses.asdict(cfg), "presets": list(presets),
                          "seeds": list(seeds), "runs": runs, "real": real_runs, "total_s": time.perf_counter() - start,
                          "host": {"node": platform.node(), "cpus": _cpu_count(), "torch": torch.__version__,
                                   "workers": workers}})


# ---------------------------------------------------------------------------------------------------------
# reporting


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return str(value)


ROW_NAMES = {"diffae": "DiffAE (flow decoder)", "regression": "regression AE (L2)",
             "oracle_denoiser": "oracle denoiser (clean flux)", "oracle_resample": "oracle resample (clean + fresh noise)",
             "unconditional": "ignores latent (another real clip)", "input": "input itself",
             "oracle_gaussian": "oracle Gaussian noise model (clean + the decoder's calibrated noise)"}


def _gain(r: dict[str, Any]) -> str:
    # no positive photon-transfer slope at all: the output carries no shot-noise signature
    return "none (slope<=0)" if r["gain_ratio"] is None and r.get("gain_input") else _fmt(r["gain_ratio"])


def render_markdown(res: dict[str, Any]) -> str:
    """The results as a markdown report: setup, main table, sampler table, verdict."""
    cfg, data = res["config"], res["data"]
    tr = res["training"]
    lines = [
        "# AE quality benchmark: DiffAE vs regression AE",
        "",
        f"Simulator preset `{cfg['preset']}`; {cfg['train_movies']} training movies of "
        f"{cfg['train_frames']}x{cfg['movie_side']}x{cfg['movie_side']}, {data['held_out_clips']} held-out clips "
        f"{data['clip_shape']} from {cfg['test_movies']} other movies ({data['neurons_held_out']} neurons); "
        f"model input normalized as `{cfg.get('normalization', 'photon')}` (photons, or their generalized Anscombe "
        f"transform), metrics in photons; training precision {cfg.get('precision', 'fp32')}. "
        f"Both models: `experiment={cfg['experiment']}` {' '.join(cfg['model_overrides'])}, "
        f"{tr['diffae']['params']:,} parameters, {cfg['steps']} steps x batch {cfg['batch_size']}, "
        f"lr {tr['diffae']['lr']:g} warmup-cosine, EMA (EDM2 gamma {EMA_GAMMA}), seed {cfg['seed']}, same batches. "
        f"Training {tr['diffae']['s_per_step']:.2f} s/step (DiffAE), {tr['regression']['s_per_step']:.2f} s/step "
        f"(regression); total {res['timings']['total_s'] / 60:.1f} min on {res['host']['cpus']} shared CPUs, "
        f"{res['host']['threads']} torch thread(s).",
        "",
        f"Main rows decode with `{cfg['recon_sampler']}` x {cfg['recon_steps']} steps. Gain ratio = photon-transfer "
        "gain of the reconstructions / of their inputs (pooled fit over all clips; per-clip median in brackets, "
        "failed per-clip fits counted). Corr-image error = mean |C_recon - C_input|. Trace r = ROI-mean trace vs "
        "ground truth, mean over spiking neurons. Noise var ratio = mean frame-to-frame noise variance (local mean "
        "removed) of the reconstructions / of the inputs: 1 for a faithful decoder, whatever the slope. MMD^2 over per-clip features vs the inputs (split-half baseline of "
        "the inputs in brackets). RMSE to the clean flux in photons.",
        "",
        "| model | NFE | gain ratio | per-clip (failed) | noise var ratio | corr-image err | corr median | trace r "
        "| MMD^2 (baseline) | RMSE clean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["results"].items():
        lines.append(
            f"| {ROW_NAMES.get(name, name)} | {_fmt(r['nfe'])} | {_gain(r)} | "
            f"{_fmt(r['gain_ratio_clip_median'])} ({r['gain_fit_failures']}) | {_fmt(r['noise_var_ratio'])} | "
            f"{_fmt(r['corr_image_error'], 4)} | "
            f"{_fmt(r['corr_median_recon'])} (in {_fmt(r['corr_median_input'])}) | {_fmt(r.get('trace_corr'))} | "
            f"{_fmt(r.get('mmd2'))} ({_fmt(r.get('mmd2_baseline'))}) | {_fmt(r['rmse_to_clean'])} |")
    lines += [
        "",
        "Headline (DiffAE unless marked): " + ", ".join(f"{k} {_fmt(v)}" for k, v in res["headline"].items()),
        "",
        latent_use_line(res["results"]),
        "",
    ]
    if res["sampler_table"]:
        lines += [f"## Sampler vs NFE (DiffAE decoder, {data['table_clips']} held-out clips)", "",
                  "| sampler | grid | steps | NFE | gain ratio | per-clip | noise var ratio | corr-image err "
                  "| corr median | RMSE clean | s/clip |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["sampler_table"]:
        lines.append(f"| {r['sampler']} | {r.get('grid') or 'n/a'} | {r['steps']} | {r['nfe']} | {_fmt(r['gain_ratio'])} | "
                     f"{_fmt(r['gain_ratio_clip_median'])} | {_fmt(r['noise_var_ratio'])} | "
                     f"{_fmt(r['corr_image_error'], 4)} | "
                     f"{_fmt(r['corr_median_recon'])} | {_fmt(r['rmse_to_clean'])} | {_fmt(r['s_per_clip'])} |")
    return "\n".join(lines)


def latent_use_line(results: dict[str, dict[str, Any]]) -> str:
    """How much each model's reconstruction knows about its input: RMSE to the clean flux, 0 = oracle resample
    (everything but the noise draw), 1 = a decoder that ignores the latent (another real clip)."""
    floor, ceiling = results["oracle_resample"]["rmse_to_clean"], results["unconditional"]["rmse_to_clean"]

    def score(name: str) -> str:
        value = latent_use(results[name]["rmse_to_clean"], floor, ceiling)
        return "n/a (noise-dominated)" if value is None else _fmt(value)

    return (f"Latent use (RMSE to the clean flux rescaled so 0 = oracle resample, 1 = ignores the latent; the "
            f"regression AE may go below 0 because it also removes the noise): DiffAE {score('diffae')}, "
            f"regression AE {score('regression')}. Denoised PSNR (signal estimate vs clean flux, peak = the clean "
            f"flux's range): DiffAE mean head {_fmt(results['diffae'].get('psnr_denoised_db'), 2)} dB, regression AE "
            f"{_fmt(results['regression'].get('psnr_denoised_db'), 2)} dB.")


SUMMARY_LABELS = {"gain_ratio": "gain ratio (goal 0.95-1.05)", "noise_var_ratio": "noise var ratio (0.90-1.10)",
                  "trace_r": "trace r DiffAE (>= 0.95 x regression)", "trace_r_regression": "trace r regression AE",
                  "latent_use": "latent use (<= 0.20)", "corr_err": "corr-image err DiffAE",
                  "corr_err_regression": "corr-image err regression (DiffAE <=)",
                  "corr_err_other_clip": "corr-image err another clip (DiffAE <= 0.5x)",
                  "psnr_denoised_db": "denoised PSNR DiffAE (dB)", "psnr_regression_db": "PSNR regression AE (dB)"}


def _mark(ok: bool, note: str | None = None) -> str:
    return "met" if ok else "**NOT met**" + (f" ({note})" if note else "")


def render_suite_markdown(suite: dict[str, Any], name: str = "ae_quality") -> str:
    """ae_quality.md: the summary over seeds per preset, every goal's verdict, then each preset's first run
    (``name``: the output prefix's file name, which the figure names start with)."""
    cfg, presets, seeds = suite["config"], suite["presets"], suite["seeds"]
    v = suite["verdict"]
    lines = [
        "# AE quality benchmark: DiffAE vs regression AE",
        "",
        f"Simulator presets {', '.join(f'`{p}`' for p in presets)}, seeds {seeds}: each run trains both models "
        f"({cfg['steps']} steps x batch {cfg['batch_size']} on {cfg['clip_frames']}x{cfg['clip_side']}x"
        f"{cfg['clip_side']} crops, identical batches, `experiment={cfg['experiment']}` "
        f"{' '.join(cfg['model_overrides'])}) and evaluates them on held-out movies. DiffAE decodes with "
        f"`{cfg['recon_sampler']}` x {cfg['recon_steps']} steps. Total {suite['total_s'] / 60:.1f} min on "
        f"{suite['host']['workers']} worker processes ({suite['host']['cpus']} CPUs). Real movies: "
        f"`{name}_real.md`.",
        "",
        "## Summary (mean over seeds, spread = max - min)",
        "",
        "| metric | " + " | ".join(presets) + " |",
        "|---|" + "---:|" * len(presets),
    ]
    for key in HEADLINE_KEYS:
        cells = [f"{_fmt(suite['summary'][p][key])} ({_fmt(suite['summary'][p][key + '_spread'])})" for p in presets]
        lines.append(f"| {SUMMARY_LABELS[key]} | " + " | ".join(cells) + " |")
    lines += ["", "## Goals", ""]
    for where, goals in v["goals"].items():
        notes = v.get("notes", {}).get(where, {})
        lines.append(f"- `{where}`: " + "; ".join(f"{goal} {_mark(ok, notes.get(goal))}" for goal, ok in goals.items()))
    lines += ["", f"**Verdict: {'every goal met' if v['all_met'] else 'not every goal met'}.**", ""]
    for preset in presets:
        first = suite["runs"][preset][0]
        body = render_markdown(first).split("\n", 2)[2]  # drop the single run's title
        lines += [f"## Preset `{preset}`, seed {first['config']['seed']}", "", body,
                  f"Figures: `{name}_{preset}_photon_transfer.png`, `{name}_{preset}_examples.png`, "
                  f"`{name}_{preset}_samplers.png`, `{name}_{preset}_training.png`.", ""]
    return "\n".join(lines)


def render_real_markdown(suite: dict[str, Any]) -> str:
    """ae_quality_real.md: the comparison on the real movies (no ground truth: noise, correlation image, RMSE)."""
    cfg = suite["config"]
    lines = ["# AE quality on real movies", "",
             f"Movies from `shared/data/real` (calibrated by photon transfer, first {REAL_TRAIN_FRACTION:.0%} of "
             f"the frames train, the rest are held-out clips). Same models and budget as the simulator runs "
             f"({cfg['steps']} steps, seed {suite['seeds'][0]}). RMSE in photons; 'another clip' = each held-out "
             "clip replaced by one from another place (a decoder that ignores its latent).", ""]
    if not suite["real"]:
        return "\n".join(lines + ["The real movies were not present: skipped.", ""])
    lines += ["| movie | frames x H x W | mean photons | gain ratio (0.9-1.1) | noise var ratio | corr-image err DiffAE "
              "| corr-image err regression | RMSE to input DiffAE | regression | another clip | goals |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for movie, res in suite["real"].items():
        h, goals = res["headline"], suite["verdict"]["goals"][f"real:{movie}"]
        lines.append(f"| {movie} | {'x'.join(str(n) for n in res['data']['shape'])} | "
                     f"{_fmt(res['data']['mean_photons'], 2)} | {_fmt(h['gain_ratio'])} | {_fmt(h['noise_var_ratio'])} | "
                     f"{_fmt(h['corr_err'], 4)} | {_fmt(h['corr_err_regression'], 4)} | {_fmt(h['rmse_to_input'], 2)} | "
                     f"{_fmt(h['rmse_to_input_regression'], 2)} | {_fmt(h['rmse_other_clip'], 2)} | "
                     + ", ".join(f"{g} {_mark(ok)}" for g, ok in goals.items()) + " |")
    return "\n".join(lines + [""])


def write_suite_results(suite: dict[str, Any], prefix: Path) -> dict[str, Any]:
    """``<prefix>.json`` (with the top-level ``summary``), ``<prefix>.md``, ``<prefix>_real.md`` and figures."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    figure_prefixes = {preset: prefix.with_name(f"{prefix.name}_{preset}") for preset in suite["presets"]}
    figures = []
    for preset, figure_prefix in figure_prefixes.items():
        if "_figures" in suite["runs"][preset][0]:  # absent when re-rendered from a stored JSON (--from-json)
            figures += write_figures(suite["runs"][preset][0], figure_prefix)
    public = {k: v for k, v in suite.items() if k != "runs"}
    public["runs"] = {p: [{k: v for k, v in r.items() if not k.startswith("_")} for r in rs]
                      for p, rs in suite["runs"].items()}
    # re-rendered from a stored JSON (no figures drawn): the figures beside it under this prefix
    public["figures"] = [Path(f).name for f in figures] or sorted(
        p.name for f in figure_prefixes.values() for p in f.parent.glob(f"{f.name}_*.png"))
    real_md = prefix.with_name(prefix.name + "_real.md")
    write_text_atomic(prefix.with_suffix(".md"), render_suite_markdown(public, prefix.name))
    write_text_atomic(real_md, render_real_markdown(public))
    write_json_atomic(prefix.with_suffix(".json"), to_jsonable(public))
    return {"json": str(prefix.with_suffix(".json")), "md": str(prefix.with_suffix(".md")), "real_md": str(real_md),
            "figures": figures}


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


COLORS = {"input": "black", "diffae": "tab:red", "regression": "tab:blue", "oracle_denoiser": "tab:gray",
          "oracle_resample": "tab:green"}


def write_figures(res: dict[str, Any], prefix: Path) -> list[str]:
    """Photon-transfer curves, example frames/correlation images/traces, sampler curves, loss curves."""
    from matplotlib.figure import Figure

    recons, evalset, data = (res["_figures"][k] for k in ("recons", "evalset", "data"))
    paths = []

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name in ("input", "diffae", "regression", "oracle_denoiser"):
        pt = pooled_photon_transfer(recons[name])
        if pt is None:
            continue
        ax.plot(pt.means, pt.variances, "o", ms=3, color=COLORS[name], label=f"{ROW_NAMES[name]}: gain {pt.gain:.3f}")
        xs = np.array([pt.means.min(), pt.means.max()])
        ax.plot(xs, pt.gain * (xs - pt.offset), "-", color=COLORS[name], lw=1)
    ax.set_yscale("symlog", linthresh=1.0)  # a noisy decoder and a smooth one differ by orders of magnitude
    ax.set_xlabel("local mean (photons)")
    ax.set_ylabel("noise variance (photons^2)")
    ax.set_title("Photon transfer of held-out reconstructions")
    ax.legend(fontsize=7)
    paths.append(prefix.with_name(prefix.name + "_photon_transfer.png"))
    _save(fig, paths[-1])

    clip = int(np.argmax(evalset.clean.reshape(len(evalset.clean), -1).std(axis=1)))  # the liveliest clip
    frame = evalset.inputs.shape[1] // 2
    names = ["input", "diffae", "regression", "oracle_denoiser"]
    fig = Figure(figsize=(11, 8))
    vmin, vmax = np.percentile(evalset.inputs[clip], [1, 99.5])
    for j, name in enumerate(names):
        ax = fig.add_subplot(3, 4, j + 1)
        ax.imshow(recons[name][clip, frame], cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_title(f"{ROW_NAMES[name].split(' (')[0]}\nframe {frame}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(3, 4, 5 + j)
        ax.imshow(local_correlation_image(recons[name][clip]), cmap="magma", vmin=0, vmax=1)
        ax.set_title("correlation image", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(3, 1, 3)
    movie = data.held_out[0]
    mine = [k for k, m in enumerate(evalset.movie_index) if m == 0]
    active = np.argmax(np.where(movie.truth.rois.any(axis=(1, 2)), movie.truth.traces.std(axis=1), -1))
    roi = movie.truth.rois[active]
    gt = movie.truth.traces[active]
    for name in ("input", "diffae", "regression"):
        stitched = stitch(recons[name][mine], [evalset.origins[k] for k in mine], movie.photons.shape)
        ax.plot(stitched[:, roi].mean(axis=1), color=COLORS[name], lw=1, label=ROW_NAMES[name])
    ax2 = ax.twinx()
    ax2.plot(gt, color="tab:orange", lw=1, ls="--", label="ground-truth calcium")
    ax2.set_ylabel("GT trace")
    ax.set_xlabel(f"frame (clip boundaries every {evalset.inputs.shape[1]})")
    ax.set_ylabel("ROI mean (photons)")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    paths.append(prefix.with_name(prefix.name + "_examples.png"))
    _save(fig, paths[-1])

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for sampler in res["config"]["table_samplers"]:
        for grid in res["config"].get("table_grids", ["uniform"]):
            rows = [r for r in res["sampler_table"] if r["sampler"] == sampler and r.get("grid", "uniform") == grid]
            nfe = [max(1, r["nfe"]) for r in rows]
            label = sampler if grid == "uniform" else f"{sampler} {grid}"
            ax1.plot(nfe, [np.nan if r["gain_ratio"] is None else r["gain_ratio"] for r in rows], "o-", label=label)
            ax2.plot(nfe, [r["corr_image_error"] for r in rows], "o-", label=label)
    reg = [r for r in res["sampler_table"] if r["sampler"].startswith("regression")]
    if reg:
        if reg[0]["gain_ratio"] is not None:
            ax1.axhline(reg[0]["gain_ratio"], color=COLORS["regression"], ls=":", label="regression AE")
        ax2.axhline(reg[0]["corr_image_error"], color=COLORS["regression"], ls=":", label="regression AE")
    ax1.axhspan(*DIFFAE_GAIN_BAND, color="tab:green", alpha=0.15, label="goal band")
    # a decoder without a residual network decodes in 0 NFE whatever the sampler: plot it at 1
    nfes = [max(1, r["nfe"]) for r in res["sampler_table"] if r["sampler"] in res["config"]["table_samplers"]]
    for ax, label in ((ax1, "gain ratio (recon / input)"), (ax2, "correlation-image error")):
        ax.set_xscale("log")
        ax.set_xlim(0.8 * min(nfes), 1.25 * max(nfes))  # explicit: an all-NaN column would leave no data limits
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    paths.append(prefix.with_name(prefix.name + "_samplers.png"))
    _save(fig, paths[-1])

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for kind, info in res["training"].items():
        loss = np.asarray(info["loss"])
        window = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window, smooth, color=COLORS[kind], label=f"{ROW_NAMES[kind]}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (running mean)")
    ax.legend(fontsize=7)
    paths.append(prefix.with_name(prefix.name + "_training.png"))
    _save(fig, paths[-1])
    return [str(p) for p in paths]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


ABLATION = {  # name -> DiffAE overrides; every row trains on the same batches with the same regression AE baseline
    "mean_flow (default: mean head + analytic noise)": [],
    "mean_flow, upsampling mean head": ["model.mean_head=upsampler"],
    "mean_flow, upsampling mean head, 1.8x the steps": ["model.mean_head=upsampler"],
    "mean_flow + residual UNet": ["model.residual_unet=true"],
    "flow + analytic noise (previous default)": ["model.decoder_form=flow"],
    "flow + analytic noise, time shift 3": ["model.decoder_form=flow", "model.diffusion.shift=3.0"],
}


# variants trained for more steps than the others: the upsampling head's step costs ~0.55 of the UNet head's, so
# 1.8x its steps is about the default's training time (compare the s_per_step column of the same table)
ABLATION_STEPS = {"mean_flow, upsampling mean head, 1.8x the steps": 1.8}


def run_ablation(cfg: BenchConfig, workers: int) -> dict[str, Any]:
    """Each :data:`ABLATION` variant on one preset and seed (no sampler table); rows of headline metrics."""
    jobs = [("sim", name, dataclasses.replace(cfg, table_clips=0, model_overrides=[*cfg.model_overrides, *extra],
                                              steps=round(cfg.steps * ABLATION_STEPS.get(name, 1.0))))
            for name, extra in ABLATION.items()]
    if workers <= 1:
        done = [_job(job) for job in jobs]
    else:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_job, jobs))
    return {name: {**res["headline"], "steps": res["training"]["diffae"]["steps"],
                   "s_per_step": res["training"]["diffae"]["s_per_step"],
                   "params": res["training"]["diffae"]["params"], "final_loss": res["training"]["diffae"]["final_loss"]}
            for _, name, res in done}


def render_ablation(rows: dict[str, Any], cfg: BenchConfig) -> str:
    """ae_quality_ablation.md: one row per decoder variant."""
    keys = ("gain_ratio", "noise_var_ratio", "trace_r", "trace_r_regression", "latent_use", "corr_err",
            "corr_err_regression", "psnr_denoised_db", "psnr_regression_db", "steps", "s_per_step", "params")
    lines = ["# Stage-1 decoder ablation", "",
             f"Preset `{cfg.preset}`, seed {cfg.seed}, {cfg.steps} steps x batch {cfg.batch_size} (rows with more "
             "`steps` are named so), identical batches; "
             "each row retrains its DiffAE variant and the regression AE baseline. Decoding: "
             f"`{cfg.recon_sampler}` x {cfg.recon_steps}. Produced by `python benchmarks/ae_quality.py --ablation`.", "",
             "| variant | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    return "\n".join(lines + [""])


def _grid_arg(spec: str) -> str:
    """``--table-grids`` values are checked before any training (argparse prints the one-line error)."""
    try:
        parse_grid(spec)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line -> namespace with ``cfg`` (BenchConfig) and ``out`` (output prefix) filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~3 min smoke run (outputs/benchmarks/ae_quality_quick/)")
    p.add_argument("--presets", nargs="+", default=None, help="simulator presets (default: default two_photon)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per preset (default: 0 1 2)")
    p.add_argument("--no-real", action="store_true", help="skip the real movies of shared/data/real")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one torch thread each)")
    p.add_argument("--ablation", action="store_true", help="decoder variants on one preset/seed instead")
    p.add_argument("--from-json", type=Path, help="re-derive summary, verdict and reports from a stored suite JSON")
    p.add_argument("--steps", type=int, help="training steps per model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--threads", type=int)
    p.add_argument("--recon-steps", type=int)
    p.add_argument("--table-nfe", type=int, nargs="+")
    p.add_argument("--table-samplers", nargs="+", choices=sorted(FLOW_EVALS_PER_STEP))
    p.add_argument("--table-grids", nargs="+", type=_grid_arg, help="sampling time grids: uniform | shift:S | rho:R")
    p.add_argument("--table-clips", type=int)
    p.add_argument("--normalization", choices=["photon", "anscombe"])
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--noise-skip", action=argparse.BooleanOptionalAction, default=None,
                   help="analytic noise term in the DiffAE velocity (model.noise_skip)")
    p.add_argument("--clip-side", type=int)
    p.add_argument("--experiment")
    p.add_argument("--override", action="append", default=None, help="extra Hydra override for both models")
    p.add_argument("--out", type=Path, help="output prefix (default benchmarks/results/ae_quality)")
    a = p.parse_args(argv)
    cfg = BenchConfig(**(QUICK if a.quick else {}))
    for name in ("steps", "batch_size", "lr", "threads", "recon_steps", "table_nfe", "table_samplers", "table_grids",
                 "table_clips", "normalization", "clip_side", "experiment", "precision", "noise_skip"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if a.override:
        cfg.model_overrides = [*cfg.model_overrides, *a.override]
    a.cfg = cfg
    a.presets = a.presets or (["default"] if a.quick else ["default", "two_photon"])
    a.seeds = a.seeds or ([0] if a.quick else [0, 1, 2])
    a.out = a.out or ((QUICK_OUT / "ae_quality") if a.quick else (RESULTS / "ae_quality"))
    return a


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark suite (or the ablation) and write its results; prints one summary line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # failed per-clip fits are expected for smooth reconstructions and counted in the results (gain_fit_failures)
    logging.getLogger("cadiff.eval.metrics").setLevel(logging.ERROR)
    a = parse_args(argv)
    if a.ablation:
        cfg = dataclasses.replace(a.cfg, preset=a.presets[0], seed=a.seeds[0])
        start = time.perf_counter()
        rows = run_ablation(cfg, a.workers)
        path = a.out.with_name(a.out.name + "_ablation.md")
        write_text_atomic(path, render_ablation(rows, cfg))
        write_json_atomic(path.with_suffix(".json"), to_jsonable({"config": dataclasses.asdict(cfg), "rows": rows}))
        print(f"ae_quality ablation: {len(rows)} variants ({(time.perf_counter() - start) / 60:.1f} min) -> {path}")
        return 0
    if a.from_json:
        suite = suite_verdict(json.loads(a.from_json.read_text()))
    else:
        suite = run_suite(a.cfg, a.presets, a.seeds, not a.no_real, a.workers)
    paths = write_suite_results(suite, a.out)
    summary = " ".join(f"{p}: gain {_fmt(suite['summary'][p]['gain_ratio'])} trace r {_fmt(suite['summary'][p]['trace_r'])}"
                       f" latent use {_fmt(suite['summary'][p]['latent_use'])}" for p in suite["presets"])
    print(f"ae_quality: {summary}; {'every goal met' if suite['verdict']['all_met'] else 'not every goal met'} "
          f"({suite['total_s'] / 60:.1f} min) -> {paths['md']}")
    return 0

