"""The seed project's measured stage-1 step (``<repo>/../shared/anchors/*.json``) and the normalised speedup.

Machines differ, so each side is divided by its own same-process fp32 matmul rate (2048^2 ``torch.mm``):

    speedup = (our voxels/s / our matmul FLOP/s) / (seed voxels/s / seed matmul FLOP/s)

For each clip length the anchor is the newest run (date in the file name, ``..._YYYY-MM-DD_...``) that measured
that length. See the anchors folder's README for how the seed runs were made.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadiff.errors import DataError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ANCHORS = REPO.parent / "shared" / "anchors"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class Anchor:
    """One seed measurement: clip length, voxels per second, same-process fp32 matmul FLOP/s, its file."""

    frames: int
    voxels_per_s: float
    matmul_flops: float
    step_s: float
    peak_rss_gb: float | None
    file: str

    @property
    def voxels_per_matmul_flop(self) -> float:
        return self.voxels_per_s / self.matmul_flops


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"anchor {path}: unreadable JSON ({exc})") from None
    if not (isinstance(data, dict) and isinstance(data.get("steps"), dict)
            and isinstance(data.get("matmul"), dict) and "best_flops_per_s" in data["matmul"]):
        raise DataError(f"anchor {path}: expected an object with 'steps' and 'matmul.best_flops_per_s'")
    return data


def _anchor(path: Path, data: dict[str, Any], key: str) -> Anchor:
    step = data["steps"][key]
    try:
        shape = json.loads(step["clip_shape"]) if isinstance(step["clip_shape"], str) else step["clip_shape"]
        voxels = shape[0] * shape[2] * shape[3] * shape[4]
        step_s = float(step["step_s_median"])
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise DataError(f"anchor {path}: steps.{key} lacks clip_shape [B,C,T,H,W]/step_s_median ({exc!r})") from None
    peak = step.get("peak_rss_mb_after_section", data.get("peak_rss_mb"))
    return Anchor(frames=int(shape[2]), voxels_per_s=voxels / step_s, step_s=step_s,
                  matmul_flops=float(data["matmul"]["best_flops_per_s"]),
                  peak_rss_gb=float(peak) / 1e3 if peak else None, file=path.name)


def load_anchors(folder: str | Path = DEFAULT_ANCHORS) -> dict[int, Anchor]:
    """Per clip length (frames), the newest anchor run that measured it."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise DataError(f"anchors folder {folder}: missing or without *.json (expected the seed's step "
                        "measurements, upstream_step_<date>_T17.json ...)")
    newest_first = sorted(files, key=lambda p: (_DATE.findall(p.name) or [""])[0], reverse=True)
    out: dict[int, Anchor] = {}
    for path in newest_first:
        data = _read(path)
        for key in data["steps"]:
            anchor = _anchor(path, data, key)
            out.setdefault(anchor.frames, anchor)
    return out


def normalised_speedup(voxels_per_s: float, matmul_flops: float, anchor: Anchor) -> float:
    """``(voxels/s / matmul FLOP/s)`` over the anchor's same ratio."""
    return voxels_per_s / matmul_flops / anchor.voxels_per_matmul_flop
