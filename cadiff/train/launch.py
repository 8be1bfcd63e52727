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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadiff.config import to_dict
from cadiff.errors import CadiffError, CheckpointError, ConfigError
from cadiff.runinfo import record_run
from cadiff.runtime.ray import init_ray
from cadiff.train.loop import train_loop_per_worker
from cadiff.train.stage import DataInfo, Stage, get_stage

log = logging.getLogger(__name__)

# `ray job submit --runtime-env-json '{"excludes": [...]}'`: gitignore patterns, so top-level folders are anchored
# with "/" - a bare "data" would also drop the cadiff/data package from the uploaded working directory.
RUNTIME_ENV_EXCLUDES = ["/.venv", "/outputs", "/data", "/.git", "/wandb", "*.tar", "*.h5", "*.tif", "*.tiff"]


@dataclass(frozen=True)
class RunPlan:
    """Everything the driver resolved before any worker starts; the job config is never written to."""

    stage: Stage
    cfg: Any  # the composed job config, as the user gave it
    run_dir: Path
    data: DataInfo
    model_config: dict[str, Any]  # resolved model config: cfg.model plus the values derived from the data

    def config_record(self) -> dict[str, Any]:
        """The run's config as recorded in config.yaml: the job config with the resolved model config."""
        return {**to_dict(self.cfg), "model": self.model_config}

    def payload(self, use_ray: bool) -> dict[str, Any]:
        """What ``train_loop_per_worker`` receives (plain, picklable values)."""
        return {"stage": self.stage.name, "cfg": to_dict(self.cfg), "run_dir": str(self.run_dir),
                "data_info": self.data.to_dict(), "model_config": self.model_config, "use_ray": use_ray}


def default_run_name() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def plan_run(cfg: Any, stage: Stage | str) -> RunPlan:
    """Resolve run folder and data; check shapes; record the run. Raises before any worker starts."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    cfg.run_name = cfg.run_name or default_run_name()
    run_dir = (Path(cfg.out_root) / stage.job / cfg.run_name).resolve()
    data, model_config = stage.resolve(cfg)
    needed = stage.data_cfg(cfg).batch_size * cfg.trainer.num_workers
    if data.num_train_clips < needed:
        raise ConfigError(f"{data.root}: {data.num_train_clips} training clips < batch_size*num_workers = {needed}")
    plan = RunPlan(stage=stage, cfg=cfg, run_dir=run_dir, data=data, model_config=model_config)
    check_resume_compatible(run_dir, plan.config_record()["model"])
    record_run(run_dir, plan.config_record(), stage.job)
    return plan


def _leaves(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def check_resume_compatible(run_dir: Path, model_config: dict[str, Any]) -> None:
    """A run with checkpoints resumes them: its recorded model config must match, else CheckpointError.

    Checked on the driver, before ``config.yaml`` is rewritten and before any worker starts.
    """
    recorded = run_dir / "config.yaml"
    if not recorded.is_file() or not any((run_dir / "checkpoints").glob("step_*")):
        return
    from omegaconf import OmegaConf

    old = _leaves(OmegaConf.to_container(OmegaConf.load(recorded), resolve=True).get("model", {}), "model")
    new = _leaves(model_config, "model")
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

    cfg, t = plan.cfg, plan.cfg.trainer
    datasets = None if plan.stage.data_cfg(cfg).deterministic else {"train": plan.stage.train_dataset(cfg)}
    resources = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.payload(use_ray=True),
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


def run_training(cfg: Any, stage: Stage | str) -> tuple[str, str]:
    """Plan, run (Ray or in-process for strategy=single) and summarize one training job."""
    if cfg.strategy.name == "single":
        plan = plan_run(cfg, stage)
        train_loop_per_worker(plan.payload(use_ray=False))
    else:
        import ray.train

        init_ray(cfg.ray)
        check_cluster_fits(cfg)
        plan = plan_run(cfg, stage)
        trainer = build_trainer(plan)  # rank 0 logs the progress line (Ray forwards it to this terminal)
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
