"""Training telemetry: metrics.jsonl mirrored to wandb (offline by default) or TensorBoard (rank 0), FLOP/s + MFU,
video grids, progress line."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadiff.io import drop_torn_tail
from cadiff.runinfo import scrub_secrets
from cadiff.runtime.heartbeat import HEARTBEAT_S
from cadiff.runtime.video import video_grid, write_video

log = logging.getLogger(__name__)

# Dense peak FLOP/s per precision of common accelerators (vendor data sheets; SXM parts; fp32 = CUDA-core FP32,
# which torch uses for fp32 matmuls unless TF32 is allowed), used when trainer.peak_flops is unset. V100 and T4
# have no bf16 tensor cores: their bf16 runs are held to the fp32 peak.
GPU_PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
    "V100": {"bf16": 15.7e12, "fp32": 15.7e12},
    "T4": {"bf16": 8.1e12, "fp32": 8.1e12},
}


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """The table's peak for a CUDA device name (``"NVIDIA A100-SXM4-80GB"``) at ``precision`` (bf16 | fp32).

    A model matches a whole word of the name (split at spaces and dashes): "L4" is not "L40S".
    """
    words = set(name.upper().replace("-", " ").split())
    for model, peaks in GPU_PEAK_FLOPS.items():
        if model in words:
            return peaks["bf16" if precision == "bf16" else "fp32"]
    return None


def measure_matmul_flops(size: int = 1024, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Achieved fp32 FLOP/s of a square matmul on this device/thread count: the CPU's practical peak for MFU."""
    generator = torch.Generator(device=device).manual_seed(0)  # leave the global RNG streams untouched
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def peak_flops_for(device: torch.device, configured: float | None, precision: str = "fp32") -> float:
    """Peak FLOP/s used for MFU: configured value, the GPU table at the run's precision, or a measured matmul."""
    if configured:
        return float(configured)
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device), precision)
        return peak if peak is not None else measure_matmul_flops(4096, device=device)
    return measure_matmul_flops()


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only) and mirrors it to wandb / TensorBoard."""

    def __init__(self, path: str | Path, wandb_run: Any = None, tensorboard: Any = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run = wandb_run
        self.tensorboard = tensorboard
        if drop_torn_tail(self.path):  # a crash mid-append: later lines start on a line of their own
            log.warning("%s ended in a torn line (a crash mid-write); it was cut", self.path)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=clean.get("step"))
        if self.tensorboard is not None:
            for key, value in scalars.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, global_step=clean.get("step"))

    def close(self) -> None:
        """Flush and close the mirrors (metrics.jsonl is closed after every line)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(logger_cfg: Any, run_dir: Path, run_name: str, config: dict) -> Any:
    """Start a wandb run on rank 0 (offline by default: never blocks on a network); None when disabled."""
    if logger_cfg.name != "wandb" or logger_cfg.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    settings = wandb.Settings(init_timeout=30, x_disable_stats=True, silent=True)
    return wandb.init(
        project=logger_cfg.project,
        name=run_name,
        id=run_name,
        resume="allow",
        dir=str(run_dir),
        mode=logger_cfg.mode,
        config=scrub_secrets(config),
        settings=settings,
    )


def start_tensorboard(logger_cfg: Any, run_dir: Path, config: dict, step: int = 0) -> Any:
    """A TensorBoard ``SummaryWriter`` over ``<run_dir>/tensorboard`` (rank 0) with the run's config as text;
    None unless ``logger=tensorboard``. A session resumed from the checkpoint of ``step`` purges the events an
    earlier session logged after it: this session logs those steps again."""
    if logger_cfg.name != "tensorboard" or logger_cfg.mode == "disabled":
        return None
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step + 1 if step else None,
                           flush_secs=30)
    text = yaml.safe_dump(scrub_secrets(config), sort_keys=False)
    writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), global_step=step)
    return writer


def log_reconstruction_videos(
    ground_truth: np.ndarray, reconstruction: np.ndarray, media_dir: Path, step: int, fps: int, wandb_run: Any = None
) -> list[Path]:
    """Grid of GT / reconstruction / GT temporal mean / reconstruction mean per clip -> GIF + MP4 (+ wandb.Video)."""
    rows = []
    for gt, rec in zip(ground_truth, reconstruction):
        rows.append([gt, rec, gt.mean(axis=0), rec.mean(axis=0)])
    grid = video_grid(rows)
    paths = [write_video(grid, media_dir / f"recon_step{step:07d}{ext}", fps) for ext in (".gif", ".mp4")]
    if wandb_run is not None:
        import wandb

        wandb_run.log({"media/reconstruction": wandb.Video(str(paths[1]), format="mp4")}, step=step)
    return paths


class ProgressLine:
    """The progress line rank 0 logs at ``trainer.log_every`` (step/max, loss, throughput, elapsed and ETA), and
    a shorter heartbeat (step, elapsed, ETA) whenever no line came for ``heartbeat_s``: a slow step, or a long
    validation, checkpoint or preview on a busy host, still shows the run is alive."""

    def __init__(self, max_steps: int, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.max_steps = max_steps
        self.heartbeat_s = heartbeat_s
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.first_step: int | None = None
        self._lock = threading.Lock()  # the heartbeat thread and the training loop both format lines

    def _timing(self, step: int) -> str:
        now = time.monotonic()
        if self.first_step is None:  # the first line of a (resumed) session: its rate counts from here
            self.first_step, self.t0 = step - 1, now - 1e-9
        rate = (step - self.first_step) / max(now - self.t0, 1e-6)
        eta = (self.max_steps - step) / rate if rate > 0 else float("nan")
        self.last_line = now
        return f"elapsed {now - self.t0:.0f}s ETA {eta:.0f}s"

    def format(self, metrics: dict[str, Any]) -> str:
        step = int(metrics.get("step", 0))
        parts = [f"step {step}/{self.max_steps}", f"loss {metrics.get('loss', float('nan')):.4f}"]
        if "val_loss" in metrics:
            parts.append(f"val {metrics['val_loss']:.4f}")
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:.3g} samples/s")
        with self._lock:
            parts.append(self._timing(step))
        return " | ".join(parts)

    def heartbeat(self, step: int) -> str | None:
        """``step N/M | elapsed ... ETA ...`` (``step`` steps done) when no line was logged for ``heartbeat_s``,
        else None. The session's first call starts the clock the rate is measured on."""
        with self._lock:
            if self.first_step is None:
                self.first_step, self.t0, self.last_line = step, time.monotonic(), time.monotonic()
                return None
            if time.monotonic() - self.last_line < self.heartbeat_s:
                return None
            return f"step {step}/{self.max_steps} | {self._timing(step)}"

    def start_heartbeat(self, steps_done: Callable[[], int], tick_s: float = 5.0) -> threading.Thread:
        """Log :meth:`heartbeat` from a daemon thread every ``tick_s``; the thread ends with this object (it holds
        only a weak reference), i.e. when the training loop returns or its exception is dropped. Called as the
        loop starts, it also starts the clock the lines' rate is measured on."""
        self.heartbeat(steps_done())
        ref = weakref.ref(self)

        def run() -> None:
            while True:
                time.sleep(tick_s)
                progress = ref()
                if progress is None:
                    return
                line = progress.heartbeat(steps_done())
                del progress
                if line:
                    log.info("%s", line)

        thread = threading.Thread(target=run, name="cadiff-progress-heartbeat", daemon=True)
        thread.start()
        return thread


def ensure_worker_logging(level: int = logging.INFO) -> None:
    """Send ``cadiff`` log records to stderr in a process where nobody configured logging (a Ray worker):
    Ray forwards a worker's stderr to the driver, so progress shows in the terminal and in job logs."""
    root, pkg = logging.getLogger(), logging.getLogger("cadiff")
    if root.handlers or pkg.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
    pkg.setLevel(level)
