"""Driver side of training: validate config against data and cluster, build the TorchTrainer, run, summarize.

The run folder is ``<out_root>/<job>/<run_name>/`` holding config.yaml, run.json, metrics.jsonl, media/,
export/model.pt and checkpoints/ (Ray Train's storage for this run). ``out_root`` may be an object-store
URI (``s3://``, ``gs://``, see :mod:`cadiff.storage`): Ray Train then persists checkpoints straight to the bucket
(``storage_filesystem``), the driver prepares the run in a temp copy of the bucket's run folder and uploads it
before training, and rank 0 writes metrics, media and the export into its own temp copy, uploaded after every
checkpoint and at the end; no local run folder is created. Re-running with the same run name
resumes from the latest checkpoint: Ray Train V2 restores its checkpoint manager from that storage, after the
driver has checked it (:func:`cadiff.train.checkpoint.prepare_resume`: damaged checkpoints set aside,
``trainer.resume_from`` applied).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cadiff import storage
from cadiff.config import leaves, to_dict
from cadiff.errors import CadiffError, ConfigError
from cadiff.io import folder_lock, parse_jsonl, write_json_atomic
from cadiff.runinfo import record_run
from cadiff.runtime.heartbeat import HEARTBEAT_S, heartbeat
from cadiff.runtime.preflight import check_cluster_paths, probe_cluster_paths, shared_paths
from cadiff.runtime.ray import init_ray, require_train_v2, train_logging_config
from cadiff.train.checkpoint import prepare_resume
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
    run_dir: Path  # an object-store run: the URI until planned_run, then the driver's temp copy of it
    data: DataInfo
    model_config: dict[str, Any]  # resolved model config: cfg.model plus the values derived from the data
    resume_dir: Path | None = None  # the checkpoint trainer.resume_from chose, verified (set under the run lock)
    run_uri: str | None = None  # the object-store run folder (run_dir is then a temp copy on this machine)

    def config_record(self) -> dict[str, Any]:
        """The run's config as recorded in config.yaml: the job config with the resolved model config."""
        return {**to_dict(self.cfg), "model": self.model_config}

    def payload(self, use_ray: bool) -> dict[str, Any]:
        """What ``train_loop_per_worker`` receives (plain, picklable values)."""
        return {"stage": self.stage.name, "cfg": to_dict(self.cfg), "run_dir": str(self.run_dir),
                "data_info": self.data.to_dict(), "model_config": self.model_config, "use_ray": use_ray,
                "resume_dir": str(self.resume_dir) if self.resume_dir else None, "run_uri": self.run_uri}

    @property
    def location(self) -> str:
        """Where the run lives for its users: the object-store URI, else the local run folder."""
        return self.run_uri or str(self.run_dir)


def default_run_name() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_dir_for(cfg: Any, stage: Stage | str) -> Path | str:
    """``<out_root>/<job>/<run_name>`` (absolute; a str for an object-store URI); names the run ``cfg.run_name``
    (a timestamp when unset)."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    cfg.run_name = cfg.run_name or default_run_name()
    if storage.is_remote(cfg.out_root):
        return str(storage.join(cfg.out_root, stage.job, cfg.run_name))
    return (storage.local_path(cfg.out_root) / stage.job / cfg.run_name).resolve()


def resolve_run(cfg: Any, stage: Stage | str) -> RunPlan:
    """Resolve run folder and data and check shapes, writing nothing (but the default sim data, when asked)."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    run_dir = run_dir_for(cfg, stage)
    data, model_config = stage.resolve(cfg)
    needed = stage.data_cfg(cfg).batch_size * cfg.trainer.num_workers
    if data.num_train_clips < needed:
        raise ConfigError(f"{data.root}: {data.num_train_clips} training clips < batch_size*num_workers = {needed}")
    return RunPlan(stage=stage, cfg=cfg, run_dir=run_dir, data=data, model_config=model_config)


@contextlib.contextmanager
def planned_run(cfg: Any, stage: Stage | str, use_ray: bool = True) -> Iterator[RunPlan]:
    """Resolve the run, then hold its lock (:func:`cadiff.io.folder_lock`) while it is checked against an
    earlier session, its checkpoint to resume is settled (``prepare_resume``), and it is recorded and trained.
    Raises before any worker starts."""
    with run_folder(resolve_run(cfg, stage)) as (plan, mirror):
        session = check_resume_compatible(plan.run_dir, plan.config_record(), plan.data)
        resume_dir = prepare_resume(plan.run_dir, cfg.trainer.resume_from, use_ray)
        record_plan(plan, session)
        mirror.sync()
        yield dataclasses.replace(plan, resume_dir=resume_dir)


@contextlib.contextmanager
def run_folder(plan: RunPlan) -> Iterator[tuple[RunPlan, storage.Mirror]]:
    """Hold the run folder while the driver checks and records the run: a local one under its lock
    (:func:`cadiff.io.folder_lock`), an object-store one as a temp copy (config records and checkpoints: the
    driver verifies checkpoints there) whose changes ``Mirror.sync`` uploads, set-aside checkpoints included,
    under :func:`cadiff.storage.object_lock` (best effort: object stores have no exclusive create)."""
    if not storage.is_remote(plan.run_dir):
        with folder_lock(plan.run_dir, "training run"), storage.mirrored(plan.run_dir) as mirror:
            yield plan, mirror
        return
    uri = str(plan.run_dir)
    if plan.cfg.trainer.resume_from is not None:
        raise ConfigError(f"trainer.resume_from={plan.cfg.trainer.resume_from!r} with out_root '{plan.cfg.out_root}': "
                          "choosing a checkpoint is supported for local run folders only; an object-store run resumes "
                          "from its latest checkpoint (drop trainer.resume_from)")
    with storage.object_lock(uri, "training run"), storage.mirrored(uri, delete=True, prefix="cadiff-run-") as mirror:
        yield dataclasses.replace(plan, run_dir=mirror.local, run_uri=uri), mirror


def record_plan(plan: RunPlan, session: int) -> None:
    """Record this session's config and data (``session``: from :func:`check_resume_compatible`)."""
    run_dir, data = plan.run_dir, plan.data
    # a resumed session records its config beside the first one (config.<n>.yaml): none is overwritten
    suffix = f".{session}" if session else ""
    record_run(run_dir, plan.config_record(), plan.stage.job, suffix=suffix)
    write_json_atomic(run_dir / f"data_info{suffix}.json", data.to_dict())


# What a resumed run may change: how long it runs and how it reports, where it runs and where its data lives
# (the data itself is compared through data_info.json). Anything else changes the training it continues.
RESUME_MAY_CHANGE = ("run_name", "out_root", "verbose", "trainer.max_steps", "trainer.stop_at_step",
                     "trainer.resume_from", "trainer.log_every", "trainer.val_every", "trainer.ckpt_every",
                     "trainer.media_every", "trainer.num_to_keep", "trainer.max_failures", "trainer.threads_per_worker",
                     "trainer.peak_flops", "logger.", "ray.", "data.root", "latents.root", "data.prepare_if_missing",
                     "data.prefetch_batches", "latents.prefetch_batches", "decode_every")
# DataInfo keys that may differ for the same data (its location)
_DATA_LOCATION = ("root", "stage1")


def check_resume_compatible(run_dir: Path, record: dict[str, Any], data: DataInfo) -> int:
    """A run with checkpoints resumes them only with the config and data it was started with.

    Compares the whole recorded config (``config.yaml``, with the resolved model config) and the recorded data
    (``data_info.json``, its location aside) with this session's; every difference outside
    :data:`RESUME_MAY_CHANGE` is listed in one ConfigError. Returns this session's number: 0 for a new run,
    n >= 1 for the n-th resumed session. Checked on the driver before anything is written.
    """
    recorded = run_dir / "config.yaml"
    if not recorded.is_file() or not any((run_dir / "checkpoints").glob("step_*")):
        return 0
    old = leaves(OmegaConf.to_container(OmegaConf.load(recorded), resolve=True))
    new = leaves(record)
    # keys absent from one side (added to the schema later) or redacted in the record are not compared
    shared = sorted(k for k in old.keys() & new.keys() if old[k] != "<redacted>"
                    and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_CHANGE))
    diffs = [f"{k}: run has {old[k]!r}, now {new[k]!r}" for k in shared if old[k] != new[k]]
    info_path = run_dir / "data_info.json"
    if info_path.is_file():
        old_info = {k: v for k, v in json.loads(info_path.read_text()).items() if k not in _DATA_LOCATION}
        new_info = {k: v for k, v in data.to_dict().items() if k not in _DATA_LOCATION}
        diffs += [f"data {k}: run has {old_info.get(k)!r}, now {new_info.get(k)!r}"
                  for k in sorted(old_info.keys() | new_info.keys()) if old_info.get(k) != new_info.get(k)]
    if diffs:
        raise ConfigError(
            f"run '{run_dir}' holds checkpoints of another config or data; resuming continues the same training, so "
            f"only {', '.join(p.rstrip('.') for p in RESUME_MAY_CHANGE[3:])} may change. Differences: "
            f"{'; '.join(diffs)}. Start a new run_name, or restore these values"
        )
    return 1 + sum(1 for _ in run_dir.glob("config.*.yaml"))


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
    where: dict[str, Any] = {"storage_path": storage_path or str(plan.run_dir)}
    if plan.run_uri and storage_path is None:
        filesystem, path = storage.filesystem(plan.run_uri)
        where = {"storage_path": path, "storage_filesystem": filesystem}
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
            **where,
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
            logging_config=train_logging_config(cfg.ray),
        ),
        datasets=datasets,
    )


def run_training(cfg: Any, stage: Stage | str) -> tuple[str, str]:
    """Plan, run (Ray or in-process for strategy=single) and summarize one training job, holding the run's lock."""
    if cfg.strategy.name == "single":
        with planned_run(cfg, stage, use_ray=False) as plan:
            train_loop_per_worker(plan.payload(use_ray=False))
            return summarize(plan.location)
    require_train_v2()
    import ray.train

    stage = get_stage(stage) if isinstance(stage, str) else stage
    paths = shared_paths(cfg, reads=[f"{stage.data_key}.root"], writes=["out_root"])
    check_cluster_paths(cfg.ray, paths)  # before anything is written
    init_ray(cfg.ray, state_api=True)  # Ray Train's placement-group cleaner queries the State API
    check_cluster_fits(cfg)
    with planned_run(cfg, stage) as plan:
        probe_cluster_paths(cfg.ray, paths)  # the data is resolved (or prepared) by now; no worker has started
        trainer = build_trainer(plan)  # rank 0 logs the progress line (Ray forwards it to this terminal)
        # Ray Train installs its own SIGINT handler for the duration of fit() and leaves it behind; restore
        # ours so a later Ctrl-C (or a forwarded SIGTERM) in this process raises KeyboardInterrupt again.
        sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        t = cfg.trainer
        log.info("training %s on %d worker(s) x %g CPU / %g GPU (%s) -> %s", plan.stage.job, t.num_workers,
                 t.cpus_per_worker, t.gpus_per_worker, cfg.strategy.name, plan.location)
        try:
            with startup_heartbeat(storage.join(plan.location, "metrics.jsonl")):
                trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise CadiffError(f"training failed in {plan.location}: {_root_cause(exc)}") from exc
        finally:
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)
        return summarize(plan.location)


def startup_heartbeat(first_output: str | Path, every_s: float = HEARTBEAT_S) -> contextlib.AbstractContextManager:
    """Log a line every :data:`HEARTBEAT_S` until ``first_output`` changes (rank 0's first metrics line): placing
    the workers, starting their process group and setting up model and data print nothing for a minute or more
    on a busy host. A resumed run's metrics.jsonl exists already: a change counts, not existence."""
    def stamp() -> float | None:
        return storage.mtime(first_output)

    before = stamp()
    return heartbeat(lambda s: f"starting the training workers ({s:.0f}s)" if stamp() == before else None, every_s)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    return text[-600:]


def summarize(run_dir: str | Path) -> tuple[str, str]:
    """Key results of a finished run (a local folder or an object-store URI) from metrics.jsonl and the export."""
    export = storage.join(run_dir, "export", "model.pt")
    if not storage.is_file(export):
        raise CadiffError(f"run {run_dir} finished without writing {export}")
    last: dict[str, Any] = {}
    metrics_path = storage.join(run_dir, "metrics.jsonl")
    if storage.is_file(metrics_path):
        for record in parse_jsonl(storage.read_text(metrics_path)):
            last.update(record)
    parts = [f"step={last.get('step', '?')}"]
    # latent_use: stage-1 val loss with the own latent / with another clip's (1 = the decoder ignores z)
    for key in ("loss", "val_loss", "val_latent_use", "samples_per_s", "mfu"):
        if key in last:
            parts.append(f"{key}={last[key]:.4g}")
    return " ".join(parts), str(run_dir)
