"""Shared stage-2 benchmark helpers: train a DiT on latents with the trainer's step, export a stage-1/stage-2
pair as the training jobs write it, and score long movies (seam ratio, photon-transfer gain drift).

Used by ``benchmarks/long_movie.py`` and ``benchmarks/generation.py``; the stage-1 side is
:func:`cadiff.bench.ae_quality.train_autoencoder`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadiff.config import StrategyConfig, compose, to_dict
from cadiff.data.conditioning import condition_width
from cadiff.data.noise import estimate_photon_transfer
from cadiff.data.pipeline import denormalize_latents
from cadiff.data.simulate import PRESETS
from cadiff.eval.rois import detect_rois, iou_matrix
from cadiff.inference.long_movie import chunk_spans
from cadiff.models.registry import build_model
from cadiff.runtime.exports import export_model
from cadiff.train.loop import TrainingModule
from cadiff.train.step import train_step
from cadiff.train.strategies import build_strategy


def train_dit(latents: torch.Tensor, steps: int, seed: int, batch: int = 8,
              overrides: tuple[str, ...] = (), conditions: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """``dit_tiny`` (plus ``overrides``) trained with the trainer's single-process step on random batches of
    ``latents``; returns the model in eval mode and ``{steps, seconds, final_loss, loss}``. ``conditions``: the
    names of the condition channels ``latents`` ends with (``cadiff.data.conditioning.CONDITIONS`` order), as
    ``train_latent`` resolves them from a latent index."""
    job = compose("train_latent", ["experiment=dit_tiny", f"trainer.max_steps={steps}", "trainer.warmup_steps=5",
                                   *overrides])
    subgrid = job.model.mask_subgrid or 1
    channels = latents.shape[1] - sum(condition_width(name, subgrid) for name in conditions)
    torch.manual_seed(seed)
    model = build_model({**to_dict(job.model), "in_channels": channels, "conditions": list(conditions),
                         "mask_subgrid": subgrid})
    model.train()
    strategy = build_strategy(StrategyConfig(name="single"), job.trainer, micro_batch_size=batch)
    strategy.setup(TrainingModule(model), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=generator)
        losses.append(float(train_step(strategy, iter([latents[idx]]), step, generator=generator).loss))
    model.eval()
    return model, {"steps": steps, "seconds": time.perf_counter() - start, "loss": losses,
                   "final_loss": float(np.mean(losses[-max(1, steps // 10):]))}


@torch.no_grad()
def decode_photons(ae: Any, z: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor], data: Any,
                   generator: torch.Generator) -> np.ndarray:
    """DiT latents ``z`` (normalized by the training latents' channel ``stats``: mean, std) -> photon clips
    ``[N, T, H, W]`` float32 through the stage-1 decoder."""
    x = ae.decode(denormalize_latents(z, stats), generator=generator)
    return data.to_photons(x[:, 0].double().numpy()).astype(np.float32)


def export_pair(root: Path, ae: Any, data: Any, dit: Any, mean: torch.Tensor, std: torch.Tensor,
                clip_frames: int, clip_side: int, preset: str = "default") -> tuple[Path, float]:
    """Stage-1 and stage-2 exports under ``root`` as the training jobs write them, with the calibration of the
    simulator ``preset``; returns the stage-2 export path and the gain (ADU/photon)."""
    params = PRESETS[preset]
    calib = {"gain": float(params["gain"]), "offset": float(params["offset"]), "rate_hz": float(data.rate_hz),
             "read_noise": data.read_noise_photons * float(params["gain"])}
    norm = {"kind": data.normalization, "center": data.center, "scale": data.scale}
    stage1 = export_model(root / "s1" / "export" / "model.pt", ae.state_dict(), ae.model_config,
                          {"stage": "ae", "data": {"sources": {"sim-000": calib}, "normalization": norm,
                                                   "sample_shape": [1, clip_frames, clip_side, clip_side]}})
    latent = [ae.z_channels, 1 + (clip_frames - 1) // ae.temporal_downsample, clip_side // ae.spatial_downsample,
              clip_side // ae.spatial_downsample]
    stage2 = export_model(root / "s2" / "export" / "model.pt", dit.state_dict(), dict(dit.model_config),
                          {"stage": "latent", "data": {"stage1": str(stage1), "sample_shape": latent,
                                                       "channel_mean": mean.tolist(), "channel_std": std.tolist()}})
    return stage2, calib["gain"]


def seam_frames(record: dict[str, Any]) -> list[int]:
    """Indices ``i`` of the frame steps ``i -> i + 1`` that cross a decoder-window seam (``samples.json`` record)."""
    plan = record["long_movie"]
    s_t = plan["temporal_downsample"]
    # a window's new latent frames [a, b) are clip frames [1 + (a-1) s_t, 1 + (b-1) s_t): seams before 1 + (b-1) s_t
    return [(b - 1) * s_t for _, _, b in chunk_spans(plan["num_latent"], plan["chunk"], plan["context"])[:-1]]


def seam_ratio(movie: np.ndarray, record: dict[str, Any]) -> float | None:
    """Mean |d frame-mean| across decoder-window seams over the same inside windows (None: one window)."""
    seams = seam_frames(record)
    return frame_mean_seam_ratio(movie, seams) if seams else None


def frame_mean_seam_ratio(movie: np.ndarray, seams: list[int]) -> float:
    """Mean |d frame-mean| across the frame steps ``seams`` (``i -> i + 1``) over the same at every other step."""
    steps = np.abs(np.diff(movie.reshape(len(movie), -1).mean(axis=1, dtype=np.float64)))
    inside = np.ones(len(steps), dtype=bool)
    inside[seams] = False
    return float(steps[seams].mean() / steps[inside].mean())


def gain_drift(movie: np.ndarray) -> dict[str, Any]:
    """Photon-transfer gain of the first and last 10% of the frames (at least 32 frames each)."""
    n = max(32, len(movie) // 10)
    first, last = estimate_photon_transfer(movie[:n]).gain, estimate_photon_transfer(movie[-n:]).gain
    return {"frames": n, "gain_first": float(first), "gain_last": float(last), "last_over_first": float(last / first)}


def cell_persistence(photons: np.ndarray, segment: int = 65) -> dict[str, float | None]:
    """Do a long movie's cells stay where they are? The movie ``[T, H, W]`` (photons) is cut into consecutive
    ``segment``-frame pieces; ROIs are detected in each (mean image, :func:`cadiff.eval.rois.detect_rois`) and every
    ROI of a piece is scored by its best IoU with the next piece's ROIs. ``persistence``: the mean of those scores
    (1: the same cells throughout; a real field of view holds its cells, so its value is the detector's own
    repeatability); ``rois_per_segment``: the mean ROI count; ``whole_movie_rois``: ROIs of the whole movie's mean
    image (cells that wander blur out of it); ``mean_image_corr``: the mean correlation of consecutive pieces' mean
    images (the whole field's structure, cells or not, with no detector in between); ``mean_flux``: photons per
    pixel per frame."""
    pieces = [photons[i:i + segment] for i in range(0, len(photons) - segment + 1, segment)]
    rois = [detect_rois(p, method="mean") for p in pieces]
    scores = [float(iou_matrix(a, b).max(axis=1).mean()) for a, b in zip(rois, rois[1:]) if len(a) and len(b)]
    means = [p.mean(axis=0) for p in pieces]
    corr = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(means, means[1:])]
    return {"segment": segment, "persistence": float(np.mean(scores)) if scores else None,
            "mean_image_corr": float(np.mean(corr)) if corr else None, "mean_flux": float(np.mean(photons)),
            "rois_per_segment": float(np.mean([len(r) for r in rois])) if rois else None,
            "whole_movie_rois": int(len(detect_rois(photons, method="mean")))}
