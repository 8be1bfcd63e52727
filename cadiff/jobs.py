"""The jobs: name -> ``main(cfg) -> (key results, output path)``, the one table the job scripts, the ``cadiff``
command and the tests share.

Each main imports its subsystem when called, so starting one job does not import every other job's stack
(Ray Tune, Ray Data, matplotlib).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

JobMain = Callable[[Any, list[str]], tuple[str, str]]  # (config, command-line overrides)


def prepare_data(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Movies (simulator, TIFF, HDF5, NWB, Neurofinder, Allen) -> calibrated, normalized clip shards + index.json."""
    from cadiff.data.prepare import prepare_data as prepare

    summary = prepare(cfg)
    t, h, w = summary["clip_shape"]
    return f"{summary['num_train']} train / {summary['num_val']} val clips {t}x{h}x{w}", summary["out"]


def train_ae(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Stage 1: train the diffusion autoencoder (or model=regression_ae) on clip shards with Ray Train."""
    from cadiff.train.launch import run_training

    return run_training(cfg, "ae")


def train_latent(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Stage 2: train the DiT with flow matching on the stage-1 latents with Ray Train."""
    from cadiff.train.launch import run_training

    return run_training(cfg, "latent")


def encode_latents(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Encode clip shards with a stage-1 export into latent shards (Ray Data), with per-channel stats."""
    from cadiff.inference.encode import encode_latents as encode

    return encode(cfg)


def sample(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Generate movies (stage 2 + stage-1 decoder) or reconstruct clips (mode=reconstruct): TIFF and/or NWB + GIF/MP4."""
    from cadiff.inference.sample import run_sample

    return run_sample(cfg)


def evaluate(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Weights-free calcium-imaging metrics of generated movies against reference data: JSON, Markdown, plots."""
    from cadiff.eval.report import evaluate_config, summary_line
    from cadiff.runinfo import record_run

    metrics = evaluate_config(cfg)
    record_run(cfg.out, cfg, "evaluate")
    return summary_line(metrics), cfg.out


def sweep(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Ray Tune sweep over a search space (search_spaces/*.yaml); every trial is a TorchTrainer run.

    The command-line overrides are forwarded to every trial.
    """
    from cadiff.tune.sweep import run_sweep

    return run_sweep(cfg, overrides)


def export(cfg: Any, overrides: list[str]) -> tuple[str, str]:
    """Simulated movies with their ground truth (footprints, spikes, clean traces, calibration) as ImageJ TIFF + NPZ,
    NWB and a suite2p layout.

    python jobs/export.py source=sim out=outputs/export/sim
    """
    from cadiff.data.export import export_simulated

    return export_simulated(cfg)


JOBS: dict[str, JobMain] = {
    "prepare_data": prepare_data,
    "train_ae": train_ae,
    "encode_latents": encode_latents,
    "train_latent": train_latent,
    "sample": sample,
    "evaluate": evaluate,
    "sweep": sweep,
    "export": export,
}
