"""Preview videos written during training: stage-1 reconstructions and stage-2 decoded samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadiff.runtime.video import video_grid, write_video
from cadiff.train.logging import log_reconstruction_videos


def preview_calib(data_info: dict[str, Any]) -> dict[str, Any]:
    """Calibration used to show previews in photon units: the first source of the training data."""
    return next(iter(data_info["sources"].values()))


def to_photons(x: torch.Tensor, data_info: dict[str, Any]) -> np.ndarray:
    """Normalized clips [B,1,T,H,W] -> photon units [B,T,H,W] (inverse of the shard normalization)."""
    from cadiff.data.movie import denormalize
    from cadiff.data.movie import to_photons as adu_to_photons

    calib = preview_calib(data_info)
    adu = denormalize(x[:, 0], calib, data_info["normalization"])
    return adu_to_photons(adu, float(calib["gain"]), float(calib["offset"]))


def log_stage1(model, x, data_info, media_dir: Path, step: int, logger_cfg, wandb_run=None) -> list[Path]:
    """GT / reconstruction / GT mean / reconstruction mean grid for fixed val clips."""
    recon = model.reconstruct(x) if hasattr(model, "reconstruct") else model.decode(model.encode(x))
    return log_reconstruction_videos(to_photons(x, data_info), to_photons(recon, data_info), media_dir, step, logger_cfg.video_fps, wandb_run)


def log_stage2(model, latent_shape, data_info, media_dir: Path, step: int, logger_cfg, wandb_run=None) -> list[Path]:
    """Sample two latents with the EMA DiT, decode them with the stage-1 export, write a grid video."""
    from cadiff.runtime.exports import load_exported_model

    generator = torch.Generator(device="cpu").manual_seed(step)
    device = next(model.parameters()).device
    z = model.sample((2, *latent_shape), generator=generator).to(device)
    mean = torch.tensor(data_info["channel_mean"], device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(data_info["channel_std"], device=device).view(1, -1, 1, 1, 1)
    decoder, stage1_meta, _ = load_exported_model(data_info["stage1"], "stage1", "ae")  # cached across steps
    clips = decoder.to(device).decode(z * std + mean)
    movies = to_photons(clips, stage1_meta["data"])
    grid = video_grid([[m for m in movies]])
    paths = [write_video(grid, media_dir / f"samples_step{step:07d}{ext}", logger_cfg.video_fps) for ext in (".gif", ".mp4")]
    if wandb_run is not None:
        import wandb

        wandb_run.log({"media/samples": wandb.Video(str(paths[1]), format="mp4")}, step=step)
    return paths
