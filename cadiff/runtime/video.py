"""Preview videos: uint8 grids of movie panels written as GIF or MP4 (imageio + PyAV), atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cadiff.io import atomic_path

# Panels smaller than this many pixels are enlarged (nearest neighbour, integer factor) in preview videos ...
MIN_PANEL_PX = 128
# ... as long as the enlarged grid stays under this many bytes (a long rollout of many samples stays 1x).
MAX_UPSCALED_BYTES = 256 * 2**20


def _to_uint8(frames: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (frames - lo) / max(hi - lo, 1e-8)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def grid_range(panels: list[np.ndarray]) -> tuple[float, float]:
    """One intensity range for a whole grid: the widest 0.5-99.5 percentile range of its panels.

    Constant panels (blank padding) set no range; a shared range keeps mismatched levels visible.
    """
    ranges = [np.percentile(p, (0.5, 99.5)) for p in panels if p.size and np.ptp(p) > 0]
    if not ranges:
        return 0.0, 1.0
    return float(min(r[0] for r in ranges)), float(max(r[1] for r in ranges))


def upscale_factor(panel_hw: tuple[int, int], grid_bytes: int, min_panel_px: int = MIN_PANEL_PX) -> int:
    """Integer enlargement that brings the smaller panel side to ``min_panel_px``, within the byte budget."""
    wanted = max(1, math.ceil(min_panel_px / max(1, min(panel_hw))))
    budget = max(1, math.isqrt(MAX_UPSCALED_BYTES // max(grid_bytes, 1)))
    return min(wanted, budget)


def video_grid(rows: list[list[np.ndarray]], pad: int = 2, min_panel_px: int = MIN_PANEL_PX) -> np.ndarray:
    """Tile ``rows`` of panels (each [T,H,W] float, or [H,W] broadcast over T) into a uint8 video [T,H',W'],
    all panels on one intensity scale, enlarged (nearest) so small panels are at least ``min_panel_px``."""
    num_frames = max(p.shape[0] for row in rows for p in row if p.ndim == 3)
    lo, hi = grid_range([p for row in rows for p in row])
    tiles = []
    for row in rows:
        panels = []
        for p in row:
            p = np.broadcast_to(p, (num_frames, *p.shape)) if p.ndim == 2 else p
            panels.append(np.pad(_to_uint8(p, lo, hi), ((0, 0), (pad, pad), (pad, pad))))
        tiles.append(np.concatenate(panels, axis=2))
    grid = np.concatenate(tiles, axis=1)
    factor = upscale_factor(rows[0][0].shape[-2:], grid.nbytes, min_panel_px)
    if factor > 1:
        grid = grid.repeat(factor, axis=1).repeat(factor, axis=2)
    return grid


def write_video(frames_u8: np.ndarray, path: str | Path, fps: int = 10) -> Path:
    """Write a [T,H,W] uint8 video as GIF or MP4 (by suffix), atomically."""
    import imageio.v3 as iio

    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        if path.suffix == ".gif":
            iio.imwrite(tmp, frames_u8, extension=".gif", duration=1000 / fps, loop=0)
        else:
            h, w = frames_u8.shape[1:]
            padded = np.pad(frames_u8, ((0, 0), (0, (-h) % 16), (0, (-w) % 16)))  # codec macroblock size
            rgb = np.repeat(padded[..., None], 3, axis=-1)
            iio.imwrite(tmp, rgb, extension=".mp4", fps=fps, codec="libx264", plugin="pyav")
    return path
