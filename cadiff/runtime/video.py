"""Preview videos: uint8 grids of movie panels written as GIF or MP4 (imageio + PyAV), atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cadiff.io import atomic_path


def _to_uint8(frames: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (frames - lo) / max(hi - lo, 1e-8)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def video_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile ``rows`` of panels (each [T,H,W] float, or [H,W] broadcast over T) into a uint8 video [T,H',W']."""
    num_frames = max(p.shape[0] for row in rows for p in row if p.ndim == 3)
    tiles = []
    for row in rows:
        panels = []
        for p in row:
            p = np.broadcast_to(p, (num_frames, *p.shape)) if p.ndim == 2 else p
            lo, hi = np.percentile(p, 0.5), np.percentile(p, 99.5)
            panels.append(np.pad(_to_uint8(p, lo, hi), ((0, 0), (pad, pad), (pad, pad))))
        tiles.append(np.concatenate(panels, axis=2))
    return np.concatenate(tiles, axis=1)


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
