"""Training previews: stage-1 reconstructions and stage-2 decoded samples as GIF/MP4 videos, plus a labelled
still PNG per preview (one intensity scale per grid, panels enlarged) that the run report embeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadiff.data.movie import denormalize, to_source_units
from cadiff.data.movie import to_photons as adu_to_photons
from cadiff.data.pipeline import denormalize_latents
from cadiff.report_html import image_grid, save_png
from cadiff.runtime.exports import load_exported_model
from cadiff.runtime.video import video_grid, write_video
from cadiff.train.logging import log_reconstruction_videos

# Preview stills: file name prefixes in media/ (the run report embeds the latest of each)
RECON_PREFIX, SAMPLES_PREFIX = "recon_step", "samples_step"


def to_preview_units(x: torch.Tensor, normalization: dict[str, Any], calib: dict[str, Any]) -> np.ndarray:
    """Normalized clips [B,1,T,H,W] -> photon units [B,T,H,W] (inverse of the shard normalization), or the
    source's own units for raw-unit data (calibration none: no photon scale)."""
    stored = denormalize(x[:, 0], calib, normalization)
    if normalization["kind"] == "raw":
        return np.asarray(to_source_units(stored, calib), dtype=np.float32)
    return adu_to_photons(stored, float(calib["gain"]), float(calib["offset"]))


def preview_unit(normalization: dict[str, Any]) -> str:
    """The unit :func:`to_preview_units` returns, for labels."""
    return "raw units" if normalization["kind"] == "raw" else "photons"


def write_still(rows: list[list[np.ndarray]], column_titles: Sequence[str], row_titles: Sequence[str],
                path: Path, unit: str = "photons") -> Path:
    """A labelled grid of [H, W] images on one intensity scale (colour bar in ``unit``), as a PNG (atomic)."""
    save_png(image_grid(rows, column_titles, row_titles, unit), path)
    return path


def log_stage1(model, x, normalization: dict[str, Any], calib: dict[str, Any], media_dir: Path, step: int, logger_cfg,
               wandb_run=None) -> list[Path]:
    """GT / reconstruction / GT mean / reconstruction mean grid for fixed val clips: video and still."""
    recon = model.reconstruct(x) if hasattr(model, "reconstruct") else model.decode(model.encode(x))
    truth, rebuilt = to_preview_units(x, normalization, calib), to_preview_units(recon, normalization, calib)
    paths = log_reconstruction_videos(truth, rebuilt, media_dir, step, logger_cfg.video_fps, wandb_run)
    frames, mid = truth.shape[1], truth.shape[1] // 2
    rows = [[t[mid], r[mid], t.mean(axis=0), r.mean(axis=0)] for t, r in zip(truth, rebuilt)]
    titles = [f"input, frame {mid}", f"reconstruction, frame {mid}", f"input, mean of {frames} frames",
              f"reconstruction, mean of {frames} frames"]
    row_titles = [f"val clip {i}" for i in range(len(rows))]
    return paths + [write_still(rows, titles, row_titles, media_dir / f"{RECON_PREFIX}{step:07d}.png",
                                preview_unit(normalization))]


def log_stage2(model, latent_shape: Sequence[int], stats: tuple[torch.Tensor, torch.Tensor], stage1: str,
               media_dir: Path, step: int, logger_cfg, wandb_run=None) -> list[Path]:
    """Sample two latents with the EMA DiT, de-normalise them by the latents' channel ``stats``
    (:func:`cadiff.data.pipeline.latent_stats`), decode them with the stage-1 export, write a grid video and still."""
    generator = torch.Generator(device="cpu").manual_seed(step)
    device = next(model.parameters()).device
    z = model.sample((2, *latent_shape), generator=generator).to(device)
    decoder, stage1_meta, _ = load_exported_model(stage1, "stage1", "ae")  # cached across steps
    clips = decoder.to(device).decode(denormalize_latents(z, stats))
    data = stage1_meta["data"]
    movies = to_preview_units(clips, data["normalization"], next(iter(data["sources"].values())))
    grid = video_grid([[m for m in movies]])
    paths = [write_video(grid, media_dir / f"{SAMPLES_PREFIX}{step:07d}{ext}", logger_cfg.video_fps)
             for ext in (".gif", ".mp4")]
    if wandb_run is not None:
        import wandb

        wandb_run.log({"media/samples": wandb.Video(str(paths[1]), format="mp4")}, step=step)
    frames = movies.shape[1]
    shown = sorted({0, frames // 2, frames - 1})
    rows = [[m[i] for i in shown] + [m.mean(axis=0)] for m in movies]
    titles = [f"frame {i}" for i in shown] + [f"mean of {frames} frames"]
    row_titles = [f"sample {i}" for i in range(len(rows))]
    return paths + [write_still(rows, titles, row_titles, media_dir / f"{SAMPLES_PREFIX}{step:07d}.png",
                                preview_unit(data["normalization"]))]
