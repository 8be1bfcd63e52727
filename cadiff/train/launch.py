"""Driver side of training: validate config against data and cluster, build the TorchTrainer, run, summarize.

The run folder is ``<out_root>/<job>/<run_name>/`` holding config.yaml, run.json, metrics.jsonl, media/,
export/model.pt and checkpoints/ (Ray Train's storage for this run). Re-running with the same run name
resumes from the latest checkpoint: Ray Train V2 restores its checkpoint manager from that storage.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cadiff.config import to_dict, validate_clip_for_model
from cadiff.errors import CadiffError, CheckpointError, ConfigError, DataError
from cadiff.models.autoencoder import resolved_decoder_form
from cadiff.runinfo import record_run
from cadiff.runtime.ray import init_ray

log = logging.getLogger(__name__)

JOB_NAMES = {"ae": "train_ae", "latent": "train_latent"}
# `ray job submit --runtime-env-json '{"excludes": [...]}'`: gitignore patterns, so top-level folders are anchored
# with "/" - a bare "data" would also drop the cadiff/data package from the uploaded working directory.
RUNTIME_ENV_EXCLUDES = ["/.venv", "/outputs", "/data", "/.git", "/wandb", "*.tar", "*.h5", "*.tif", "*.tiff"]


@dataclass
class RunPlan:
    """Everything the driver resolved before any worker starts."""

    stage: str
    cfg: Any
    run_dir: Path
    data_info: dict[str, Any]
    payload: dict[str, Any] = field(default_factory=dict)


def default_run_name() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _clip_data_info(cfg: Any) -> dict[str, Any]:
    from cadiff.data.shards import read_index

    root = Path(cfg.data.root)
    if not (root / "index.json").exists():
        if not cfg.data.prepare_if_missing:
            raise DataError(f"data.root '{root}': no index.json; run jobs/prepare_data.py out={root} first")
        _prepare_default_sim(root)
    index = read_index(root)
    if index.get("kind", "clips") != "clips":
        raise DataError(f"data.root '{root}': index.json kind is '{index.get('kind')}', expected 'clips'")
    t, h, w = index["clip_shape"]
    d = cfg.data
    frames, height, width = d.crop_frames or t, d.crop_height or h, d.crop_width or w
    if frames > t or height > h or width > w:
        raise ConfigError(f"data.crop_* = {(frames, height, width)} exceeds the stored clip shape {(t, h, w)} in {root}/index.json")
    validate_clip_for_model(frames, height, width, cfg.model, "data.crop" if d.crop_frames else f"{root}/index.json clip")
    for split in ("train", "val"):
        if not index["splits"].get(split, {}).get("num_clips"):
            raise DataError(f"data.root '{root}': split '{split}' has no clips; prepare more data or lower val_fraction")
    fill_noise_model(cfg.model, index["normalization"], root, index["sources"])
    return {
        "root": str(root.resolve()),
        "sample_shape": [1, frames, height, width],
        "normalization": index["normalization"],
        "sources": index["sources"],
        "num_train_clips": index["splits"]["train"]["num_clips"],
    }


def fill_noise_model(model_cfg: Any, norm: dict[str, Any], root: Path, sources: dict[str, Any] | None = None) -> None:
    """The DiffAE's analytic noise term from the data index, per ``model.noise_skip`` (null = auto).

    ``mean_flow`` decoders get ``model.noise_model`` (normalization kind, center, scale and the read noise of the
    first source): a per-pixel noise level for Anscombe- or photon-normalized data. The ``flow`` form gets the
    homoscedastic ``noise_std = 1 / normalization.scale`` of Anscombe-normalized data.
    """
    if model_cfg.kind != "diffae" or model_cfg.diffusion.objective != "flow":
        return  # explicit noise_skip/decoder_form with DDPM fails at compose time
    mean_flow = resolved_decoder_form(model_cfg) == "mean_flow"
    if model_cfg.noise_skip is False:
        if mean_flow and model_cfg.noise_std is None and model_cfg.noise_model.kind == "none":
            raise ConfigError("model.noise_skip=false leaves the mean_flow decoder without a pixel noise level; "
                              "set model.noise_std=<std in normalized units> or model.decoder_form=flow")
        return
    if mean_flow:
        if norm.get("kind") not in ("anscombe", "photon"):
            raise ConfigError(f"{root}/index.json normalization.kind={norm.get('kind')!r}: the mean_flow decoder "
                              "needs 'anscombe' or 'photon'")
        nm = model_cfg.noise_model
        nm.kind, nm.center, nm.scale = str(norm["kind"]), float(norm["center"]), float(norm["scale"])
        nm.read_noise_photons = _read_noise_photons(sources or {})
        return
    if norm.get("kind") != "anscombe":
        if model_cfg.noise_skip is None:
            return
        raise ConfigError(f"model.noise_skip=true needs homoscedastic (Anscombe-normalized) data, but {root}/index.json "
                          f"has normalization.kind={norm.get('kind')!r}; prepare it with normalization.kind=anscombe "
                          "or set model.noise_std explicitly")
    std = 1.0 / float(norm["scale"])
    if model_cfg.noise_std is not None and abs(model_cfg.noise_std - std) > 1e-6 * std:
        raise ConfigError(f"model.noise_std={model_cfg.noise_std} contradicts model.noise_skip=true with "
                          f"{root}/index.json normalization.scale={norm['scale']} (noise std {std:.6g})")
    model_cfg.noise_std = std


def _read_noise_photons(sources: dict[str, Any]) -> float:
    """Read noise in photons of the first source (sorted id), the calibration sampling also converts with."""
    if not sources:
        return 0.0
    values = {sid: float(c.get("read_noise") or 0.0) / float(c["gain"]) for sid, c in sources.items()}
    if len(set(round(v, 6) for v in values.values())) > 1:
        log.warning("sources differ in read noise (%s photons): the decoder's noise model uses %s's",
                    values, sorted(values)[0])
    return values[sorted(values)[0]]


def _prepare_default_sim(root: Path) -> None:
    from cadiff.config import compose
    from cadiff.data.prepare import prepare_data

    log.info("data.root %s has no index.json: preparing simulated data there (source=sim)", root)
    prepare_data(compose("prepare_data", [f"out={root}"]))


def _latent_data_info(cfg: Any) -> dict[str, Any]:
    from cadiff.data.shards import read_index
    from cadiff.runtime.exports import load_export

    root = Path(cfg.latents.root)
    if not (root / "index.json").exists():
        raise DataError(f"latents.root '{root}': no index.json; run jobs/encode_latents.py out={root} first")
    index = read_index(root)
    if index.get("kind") != "latents":
        raise DataError(f"latents.root '{root}': index.json kind is '{index.get('kind')}', expected 'latents'")
    stage1 = index.get("stage1")
    if not stage1 or not Path(stage1).exists():
        raise CheckpointError(
            f"latents.root '{root}': stage-1 export '{stage1}' recorded in index.json does not exist; expected the "
            "train_ae export these latents were encoded with (re-run jobs/encode_latents.py with an existing stage1)"
        )
    _state, stage1_cfg, _meta = load_export(stage1)
    channels = int(index["latent_shape"][0])
    if int(stage1_cfg.get("z_channels", channels)) != channels:
        raise DataError(
            f"latents.root '{root}': latent_shape has {channels} channels but stage-1 export {stage1} has "
            f"z_channels={stage1_cfg.get('z_channels')} (latents from another encoder?)"
        )
    if cfg.model.in_channels not in (None, channels):
        raise ConfigError(f"model.in_channels = {cfg.model.in_channels}: expected {channels} (the latent channels in {root})")
    cfg.model.in_channels = channels
    return {
        "root": str(root.resolve()),
        "sample_shape": list(index["latent_shape"]),
        "channel_mean": index["channel_mean"],
        "channel_std": index["channel_std"],
        "stage1": str(Path(stage1).resolve()),
        "normalization": index.get("normalization"),
        "num_train_clips": index["splits"]["train"]["num_clips"],
    }


def data_info_for(cfg: Any, stage: str) -> dict[str, Any]:
    """Check the stage's data against the config (stage 1 prepares the default sim data when missing)."""
    return _clip_data_info(cfg) if stage == "ae" else _latent_data_info(cfg)


def plan_run(cfg: Any, stage: str) -> RunPlan:
    """Resolve run folder and data; check shapes; record the run. Raises before any worker starts."""
    cfg.run_name = cfg.run_name or default_run_name()
    run_dir = (Path(cfg.out_root) / JOB_NAMES[stage] / cfg.run_name).resolve()
    data_info = data_info_for(cfg, stage)
    per_worker = cfg.data.batch_size if stage == "ae" else cfg.latents.batch_size
    needed = per_worker * cfg.trainer.num_workers
    if data_info["num_train_clips"] < needed:
        raise ConfigError(
            f"{data_info['root']}: {data_info['num_train_clips']} training clips < batch_size*num_workers = {needed}"
        )
    check_resume_compatible(run_dir, cfg)
    record_run(run_dir, cfg, JOB_NAMES[stage])
    payload = {"stage": stage, "cfg": to_dict(cfg), "run_dir": str(run_dir), "data_info": data_info}
    return RunPlan(stage=stage, cfg=cfg, run_dir=run_dir, data_info=data_info, payload=payload)


def _leaves(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def check_resume_compatible(run_dir: Path, cfg: Any) -> None:
    """A run with checkpoints resumes them: its recorded model config must match, else CheckpointError.

    Checked on the driver, before ``config.yaml`` is rewritten and before any worker starts.
    """
    recorded = run_dir / "config.yaml"
    if not recorded.is_file() or not any((run_dir / "checkpoints").glob("step_*")):
        return
    from omegaconf import OmegaConf

    old = _leaves(OmegaConf.to_container(OmegaConf.load(recorded), resolve=True).get("model", {}), "model")
    new = _leaves(to_dict(cfg)["model"], "model")
    # keys absent from the record (added to the schema later) or redacted in it are not compared
    shared = sorted(k for k in old.keys() & new.keys() if old[k] != "<redacted>")
    diffs = [f"{k}: run has {old[k]!r}, now {new[k]!r}" for k in shared if old[k] != new[k]]
    if diffs:
        raise CheckpointError(
            f"run '{run_dir}' holds checkpoints of another model config ({'; '.join(diffs[:4])}); resuming needs the "
            "model config recorded in its config.yaml, or start a new run_name"
        )


def check_cluster_fits(cfg: Any) -> None:
    """Fail before any worker starts when the requested workers cannot fit the cluster."""
    import ray

    resources = ray.cluster_resources()
    t = cfg.trainer
    need_cpu = t.num_workers * t.cpus_per_worker
    if need_cpu > resources.get("CPU", 0):
        raise ConfigError(
            f"trainer.num_workers={t.num_workers} x cpus_per_worker={t.cpus_per_worker} needs {need_cpu} CPUs; "
            f"the Ray cluster has {resources.get('CPU', 0)}"
        )
    need_gpu = t.num_workers * t.gpus_per_worker
    if need_gpu > resources.get("GPU", 0):
        raise ConfigError(
            f"trainer.num_workers={t.num_workers} x gpus_per_worker={t.gpus_per_worker} needs {need_gpu} GPUs; "
            f"the Ray cluster has {resources.get('GPU', 0)}"
        )


def build_trainer(plan: RunPlan, callbacks: list | None = None, storage_path: str | None = None, name: str | None = None):
    """A Ray Train V2 ``TorchTrainer`` for the plan (used by train jobs and by Tune trials)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cadiff.train.loop import train_loop_per_worker

    cfg, t = plan.cfg, plan.cfg.trainer
    datasets = None
    data_cfg = cfg.data if plan.stage == "ae" else cfg.latents
    if not data_cfg.deterministic:
        from cadiff.data import pipeline

        if plan.stage == "ae":
            datasets = {"train": pipeline.clip_dataset(data_cfg.root, "train", data_cfg, seed=cfg.seed)}
        else:
            datasets = {"train": pipeline.latent_dataset(data_cfg.root, "train", data_cfg, seed=cfg.seed)}
    resources = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    payload = dict(plan.payload, use_ray=True)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=bool(t.gpus_per_worker), resources_per_worker=resources),
        torch_config=TorchConfig(backend=cfg.strategy.backend) if cfg.strategy.backend else None,
        run_config=RunConfig(
            name=name or "checkpoints",
            storage_path=storage_path or str(plan.run_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )


def progress_callback(max_steps: int):
    """A Ray Train UserCallback logging step/loss/ETA on the driver."""
    from ray.train import UserCallback

    from cadiff.train.logging import ProgressLine

    class _Progress(UserCallback):
        def __init__(self) -> None:
            self.line = ProgressLine(max_steps)

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and "loss" in metrics[0]:
                log.info(self.line.format(metrics[0]))

    return _Progress()


def run_training(cfg: Any, stage: str) -> tuple[str, str]:
    """Plan, run (Ray or in-process for strategy=single) and summarize one training job."""
    if cfg.strategy.name == "single":
        from cadiff.train.loop import train_loop_per_worker

        plan = plan_run(cfg, stage)
        train_loop_per_worker(dict(plan.payload, use_ray=False))
    else:
        import ray.train

        init_ray(cfg.ray)
        check_cluster_fits(cfg)
        plan = plan_run(cfg, stage)
        trainer = build_trainer(plan, callbacks=[progress_callback(cfg.trainer.max_steps)])
        # Ray Train installs its own SIGINT handler for the duration of fit() and leaves it behind; restore
        # ours so a later Ctrl-C (or a forwarded SIGTERM) in this process raises KeyboardInterrupt again.
        sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise CadiffError(f"training failed in {plan.run_dir}: {_root_cause(exc)}") from exc
        finally:
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)
    return summarize(plan.run_dir)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    return text[-600:]


def summarize(run_dir: Path) -> tuple[str, str]:
    """Key results of a finished run from metrics.jsonl and the export."""
    export = run_dir / "export" / "model.pt"
    if not export.exists():
        raise CadiffError(f"run {run_dir} finished without writing {export}")
    last: dict[str, Any] = {}
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                last.update(json.loads(line))
    parts = [f"step={last.get('step', '?')}"]
    # latent_use: stage-1 val loss with the own latent / with another clip's (1 = the decoder ignores z)
    for key in ("loss", "val_loss", "val_latent_use", "samples_per_s", "mfu"):
        if key in last:
            parts.append(f"{key}={last[key]:.4g}")
    return " ".join(parts), str(run_dir)
