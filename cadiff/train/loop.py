"""``train_loop_per_worker``: one training loop for both stages, under any Strategy, with or without Ray.

Stage 1 trains a DiffusionAutoencoder / RegressionAutoencoder on normalized clips; stage 2 trains the DiT
objective on per-channel-normalized latents. Only the model, the batch source and the previews differ, and
a :class:`cadiff.train.stage.Stage` holds those. Checkpoints hold model, optimizer, LR step, EMA, RNG states and
the data position; with
``data.deterministic=true`` a resumed run is bit-identical to an uninterrupted one (DDP, fp32). Rank 0 refreshes
the run's ``report.html`` after checkpoints (:class:`cadiff.train.report.RunReport`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cadiff import storage
from cadiff.config import from_dict
from cadiff.data import pipeline
from cadiff.errors import ConfigError
from cadiff.models.registry import build_model
from cadiff.runinfo import record_workers, worker_location
from cadiff.runtime.exports import export_model
from cadiff.runtime.memory import set_mmap_threshold
from cadiff.runtime.ray import quiet_train_reports
from cadiff.train.checkpoint import CheckpointManager, resume, resume_candidates, write_manifest
from cadiff.train.ema import EMA
from cadiff.train.logging import (
    MetricsWriter,
    ProgressLine,
    ensure_worker_logging,
    peak_flops_for,
    start_tensorboard,
    start_wandb,
)
from cadiff.train.report import RunReport
from cadiff.train.stage import DataInfo, Stage, get_stage
from cadiff.train.step import train_step
from cadiff.train.strategies import build_strategy

log = logging.getLogger(__name__)


class TrainingModule(nn.Module):
    """Routes ``forward`` to ``model.training_loss`` so DDP/FSDP2/DeepSpeed hooks see the loss computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, probe: bool = False, generator: torch.Generator | None = None) -> Any:
        """Training loss and metrics; with ``probe``, the stage-1 latent-use losses (validation telemetry)."""
        if probe:
            return self.model.validation_losses(x)
        return self.model.training_loss(x, generator)

    def shard_units(self) -> list[nn.Module]:
        return self.model.shard_units()


# ---------------------------------------------------------------------------------------------------------
# process context and reporting


class Reporter:
    """Checkpoint/metric sink: Ray Train (``ray.train.report``) or a local CheckpointManager (strategy=single)."""

    def __init__(self, use_ray: bool, run_dir: Path, num_to_keep: int,
                 after_checkpoint: Callable[[], Any] | None = None) -> None:
        self.use_ray = use_ray
        self.run_dir = run_dir
        self.after_checkpoint = after_checkpoint  # rank 0 of an object-store run: upload the run folder
        if not use_ray:
            self.manager = CheckpointManager(run_dir, num_to_keep)

    @contextlib.contextmanager
    def resume_candidates(self, target: Path | None) -> Iterator[list[Path]]:
        """Checkpoint folders to resume from, newest first (see ``checkpoint.resume_candidates``)."""
        if not self.use_ray:
            yield resume_candidates(self.manager.candidates(), target)
            return
        import ray.train

        ckpt = ray.train.get_checkpoint()  # the latest registered: the driver verified it, or this session wrote it
        if ckpt is None:
            yield resume_candidates([], target)
            return
        with ckpt.as_directory() as path:
            yield resume_candidates([Path(path)], target)

    def report(self, metrics: dict[str, Any], write_checkpoint: Any = None, step: int = 0, has_files: bool = True) -> None:
        """Report metrics; when ``write_checkpoint(dir)`` is given, persist a checkpoint written by it."""
        if write_checkpoint is None:
            if self.use_ray:
                import ray.train

                ray.train.report(metrics)
            return
        if self.use_ray:
            import ray.train

            with tempfile.TemporaryDirectory(prefix="cadiff-ckpt-") as tmp:
                write_checkpoint(Path(tmp))
                if has_files:  # Ray Train merges the ranks' folders: each part carries its own manifest
                    write_manifest(tmp, step, rank=_rank_world()[0])
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if has_files else None
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:08d}")
        else:
            tmp = self.manager.tmp_dir(step)
            write_checkpoint(tmp)
            self.manager.commit(tmp, step)
        if self.after_checkpoint is not None:
            self.after_checkpoint()


def _rank_world() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return rank, world, local
    return 0, 1, 0


def dist_mean(value: float | torch.Tensor, device: torch.device) -> float:
    """Mean of a float or 0-d tensor over all ranks (identity without a process group); a host sync."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.as_tensor(value, device=device).detach().to(torch.float64).reshape(1)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_device(use_ray: bool, gpus_per_worker: float) -> torch.device:
    """This worker's device: Ray Train's (``ray.train.torch.get_device``: right under fractional GPUs and per-worker
    ``CUDA_VISIBLE_DEVICES``), the current CUDA device in a single process, or the CPU."""
    if gpus_per_worker <= 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    if use_ray:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda", torch.cuda.current_device())


def use_deterministic_cuda(device: torch.device, deterministic: bool) -> None:
    """Under ``data.deterministic=true`` on CUDA: deterministic kernels, no cuDNN autotuning, a fixed cuBLAS
    workspace (set before the first cuBLAS call), so a resumed run repeats an uninterrupted one bit for bit."""
    if not deterministic or device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Host RNG streams and, on a CUDA worker, the stream of this worker's own device (no context on any other)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_python_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(tuple(np_state) if isinstance(np_state, list) else np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # checkpoints before this version held every visible GPU's state
            cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _as_python_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# ---------------------------------------------------------------------------------------------------------
# batches


def batch_iterator(data_cfg: Any, kind: str, seed: int, use_ray: bool, rank: int, world: int,
                   start_batch: int) -> Iterator[torch.Tensor]:
    """Infinite iterator of training batches ``[B, C, T, H, W]`` float32 for this rank."""
    if data_cfg.deterministic or not use_ray:
        yield from pipeline.deterministic_batches(
            data_cfg.root, "train", data_cfg, rank=rank, world_size=world, seed=seed, start_batch=start_batch, kind=kind
        )
        return
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    while True:
        empty = True
        for batch in shard.iter_torch_batches(batch_size=data_cfg.batch_size, drop_last=True, dtypes=torch.float32,
                                              prefetch_batches=data_cfg.prefetch_batches):
            empty = False
            yield batch["x"]
        if empty:
            raise ConfigError(
                f"data root '{data_cfg.root}': a worker received no full batch of {data_cfg.batch_size}; "
                "use fewer workers, a smaller batch_size or more clips"
            )


# ---------------------------------------------------------------------------------------------------------
# the loop


def compile_model(model: nn.Module, placement: str, backend: str = "inductor") -> None:
    """``torch.compile`` the model in place (state_dict keys unchanged) at ``placement``: blocks | model | none.

    ``blocks`` compiles each shard unit (residual/transformer block; before any FSDP2 wrapping, as torchtitan
    orders it), ``model`` each top-level network. Blocks of one class share code, so each input shape is one
    more cached graph: the dynamo cache limits are raised accordingly.
    """
    if placement == "none":
        return
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
    if placement == "blocks":
        units = list(model.shard_units())
    else:
        units = [m for m in model.children() if next(m.parameters(), None) is not None]
    for unit in units:
        unit.compile(dynamic=False, backend=backend)
    log.info("torch.compile (%s): %d %s", backend, len(units), "blocks" if placement == "blocks" else "networks")


@dataclass(frozen=True)
class WorkerRun:
    """What a worker knows about its run: the driver's plan (see ``launch.RunPlan.payload``) and its rank."""

    stage: Stage
    cfg: Any
    run_dir: Path
    data: DataInfo
    model_config: dict[str, Any]
    use_ray: bool
    rank: int
    world: int
    resume_dir: Path | None = None  # the checkpoint trainer.resume_from chose (the driver verified it)
    run_uri: str | None = None  # an object-store run: run_dir is this worker's temp copy of it

    @property
    def run_name(self) -> str:
        """The run folder's name (of the object-store run, not of the temp copy)."""
        return (self.run_uri or str(self.run_dir)).rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def from_payload(cls, payload: dict[str, Any], rank: int, world: int) -> WorkerRun:
        stage = get_stage(payload["stage"])
        return cls(stage=stage, cfg=from_dict(payload["cfg"], stage.schema), run_dir=Path(payload["run_dir"]),
                   data=DataInfo.from_dict(payload["data_info"]), model_config=dict(payload["model_config"]),
                   use_ray=bool(payload.get("use_ray", True)), rank=rank, world=world,
                   resume_dir=Path(payload["resume_dir"]) if payload.get("resume_dir") else None,
                   run_uri=payload.get("run_uri"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one stage; ``config`` is the driver's ``RunPlan.payload``.

    An object-store run (``run_uri``) is written into a temp copy of the run folder: rank 0 downloads it
    (without checkpoints/, which Ray Train persists itself; with them for strategy=single, whose checkpoint
    manager writes into the copy) and uploads it after every checkpoint and once the export is written.
    """
    rank = _rank_world()[0]
    use_ray = bool(config.get("use_ray", True))
    location = config.get("run_uri") or config["run_dir"]
    exclude = ("checkpoints",) if use_ray else ()
    threads = torch.get_num_threads()  # strategy=single trains in the caller's process: give its setting back
    try:
        with storage.mirrored(location, exclude=exclude, delete=not use_ray, download=rank == 0,
                              prefix="cadiff-worker-run-") as mirror:
            sync = mirror.sync if rank == 0 and mirror.remote else None
            _train(config | {"run_dir": str(mirror.local)}, sync)
            if sync is not None:
                sync()
    finally:
        torch.set_num_threads(threads)


def _train(config: dict[str, Any], sync: Callable[[], Any] | None) -> None:
    """The training loop of :func:`train_loop_per_worker` in the worker's run folder (``sync``: upload it)."""
    rank, world, _ = _rank_world()
    run = WorkerRun.from_payload(config, rank, world)
    if run.use_ray:
        ensure_worker_logging()
        quiet_train_reports(run.cfg.ray)
    cfg, tcfg, run_dir = run.cfg, run.cfg.trainer, run.run_dir
    threads = tcfg.threads_per_worker or max(1, int(np.ceil(tcfg.cpus_per_worker)))
    torch.set_num_threads(threads)
    # process-wide and not undone: with strategy=single it stays set in the caller's process after training
    set_mmap_threshold(tcfg.malloc_mmap_threshold_kb)
    device = worker_device(run.use_ray, tcfg.gpus_per_worker)
    use_deterministic_cuda(device, run.stage.data_cfg(cfg).deterministic)
    _seed_everything(cfg.seed + 1000 * rank)

    model = build_model(run.model_config)
    compile_model(model, tcfg.compile, tcfg.compile_backend)
    data_cfg = run.stage.data_cfg(cfg)
    strategy = build_strategy(cfg.strategy, tcfg, micro_batch_size=data_cfg.batch_size)
    strategy.setup(TrainingModule(model), device)
    if rank == 0:
        log.info("strategy %s on %s, precision %s (trainer.precision=%s)", strategy.name, device, strategy.precision,
                 tcfg.precision)
    record_placement(run, device)
    ema = EMA(strategy.ema_tensors(), decay=cfg.ema.decay, warmup_power=cfg.ema.warmup_power)
    reporter = Reporter(run.use_ray, run_dir, tcfg.num_to_keep, after_checkpoint=sync)

    step, resumed_rng = resume_state(run, reporter, strategy, ema)

    batches = batch_iterator(data_cfg, run.stage.kind, cfg.seed, run.use_ray, rank, world,
                             start_batch=step * tcfg.grad_accum)
    val_x = pipeline.val_batch(data_cfg.root, data_cfg.num_val_clips, data_cfg, kind=run.stage.kind).to(device)
    flops_fwd = float(model.flops_per_sample(run.data.sample_shape))
    peak = peak_flops_for(device, tcfg.peak_flops, strategy.precision)

    wandb_run = start_wandb(cfg.logger, run_dir, run.run_name, config["cfg"]) if rank == 0 else None
    tensorboard = start_tensorboard(cfg.logger, run_dir, config["cfg"], step) if rank == 0 else None
    writer = MetricsWriter(run_dir / "metrics.jsonl", wandb_run, tensorboard) if rank == 0 else None
    progress = ProgressLine(tcfg.max_steps) if rank == 0 else None
    run_report = RunReport(run_dir, run.stage.job) if rank == 0 else None
    window = new_window()
    last_metrics: dict[str, Any] = {}

    if progress is not None:
        progress.start_heartbeat(lambda: step)
    if resumed_rng is not None:
        set_rng_state(resumed_rng, device)  # last, so nothing set up after loading draws from the restored streams
    # stop_at_step ends this session early (checkpoint + export) without changing the LR schedule of max_steps
    end_step = min(tcfg.max_steps, tcfg.stop_at_step or tcfg.max_steps)
    while step < end_step:
        t_start = time.perf_counter()
        done = train_step(strategy, batches, step, ema=ema, ema_every=cfg.ema.update_every)
        step += 1
        accumulate(window, done, time.perf_counter() - t_start)

        is_last = step == end_step
        metrics: dict[str, Any] = {}
        if step % tcfg.log_every == 0 or is_last:
            metrics = _window_metrics(window, step, device, flops_fwd, peak, world, strategy.lr_at(step - 1))
            window = new_window()
        if step % tcfg.val_every == 0 or is_last:
            metrics = metrics or {"step": step}
            metrics["val_loss"] = _val_loss(strategy, ema, val_x, cfg.seed, device)
            if run.stage.probes_latent_use:
                metrics.update(_latent_use(strategy, ema, val_x, cfg.seed, device))
            if tcfg.score:
                metrics.update(_quality_score(run, strategy, ema, val_x))
        media_due = (tcfg.media_every and step % tcfg.media_every == 0) or is_last
        if media_due:
            _log_media(run, strategy, ema, val_x, step, wandb_run)
        if metrics:
            last_metrics = {**last_metrics, **metrics}
            if writer is not None:
                writer.write(metrics)
            if progress is not None and "loss" in metrics:
                log.info("%s", progress.format(metrics))
        ckpt_due = step % tcfg.ckpt_every == 0 or is_last
        if ckpt_due:
            extra = {"step": step, "ema": ema.state_dict(), "rng": rng_state(device), "data_position": step * tcfg.grad_accum}
            reporter.report(
                metrics or {"step": step},
                write_checkpoint=lambda d, extra=extra: strategy.save(d, extra),
                step=step,
                has_files=strategy.rank_writes_checkpoint(),
            )
            if run_report is not None and not is_last:  # the last step's report follows the export, below
                run_report.refresh(step)
        elif metrics:
            reporter.report(metrics)

    try:
        _export(run, strategy, ema, step, last_metrics)
    finally:
        if run_report is not None:
            run_report.refresh(step, last=True)  # names the export written just now (or its absence)
    if writer is not None:
        writer.close()


def record_placement(run: WorkerRun, device: torch.device) -> None:
    """Rank 0 records every rank's node, host, pid and device in the run's run.json (collective)."""
    mine = worker_location(run.rank, str(device))
    workers = [mine]
    if run.world > 1 and dist.is_initialized():
        workers = [None] * run.world
        dist.all_gather_object(workers, mine)
    if run.rank == 0:
        record_workers(run.run_dir, workers)


def resume_state(run: WorkerRun, reporter: Reporter, strategy: Any, ema: EMA) -> tuple[int, Any]:
    """Restore strategy and EMA from the newest checkpoint that verifies and loads: ``(step, rng state)``,
    ``(0, None)`` for a fresh run (collective)."""

    def load(folder: Path) -> tuple[int, Any]:
        extra = strategy.load(folder)
        ema.load_state_dict(extra["ema"])
        return int(extra["step"]), extra["rng"]

    with reporter.resume_candidates(run.resume_dir) as candidates:
        found = resume(candidates, load, registered_by_ray=run.use_ray)
    if found is None:
        return 0, None
    folder, (step, rng) = found
    if run.rank == 0:
        log.info("resumed from %s at step %d", folder, step)
    return step, rng


def new_window() -> dict[str, Any]:
    """Running sums between log steps; loss and grad norm stay device tensors until a log step reads them."""
    return {"loss": 0.0, "grad_norm": 0.0, "n": 0, "samples": 0, "wait": 0.0, "time": 0.0}


def accumulate(window: dict[str, Any], done: Any, seconds: float) -> None:
    """Add one step's :class:`StepResult` to ``window`` without a host sync."""
    window["loss"] = window["loss"] + done.loss
    window["grad_norm"] = window["grad_norm"] + done.grad_norm
    window["samples"] += done.samples
    window["n"] += 1
    window["wait"] += done.data_wait_s
    window["time"] += seconds


def _window_metrics(window: dict, step: int, device: torch.device, flops_fwd: float, peak: float, world: int, lr: float) -> dict:
    n = max(window["n"], 1)
    elapsed = max(window["time"], 1e-9)
    samples_per_s = window["samples"] / elapsed
    achieved = 3.0 * flops_fwd * samples_per_s  # forward + backward ~ 3x forward (Kaplan et al. 2020)
    return {
        "step": step,
        "loss": dist_mean(window["loss"] / n, device),
        "grad_norm": dist_mean(window["grad_norm"] / n, device),
        "lr": lr,
        "samples_per_s": dist_mean(samples_per_s, device) * world,
        "flops_per_s": dist_mean(achieved, device) * world,
        "mfu": dist_mean(achieved / peak, device),
        "data_wait_frac": dist_mean(window["wait"] / elapsed, device),
    }


@torch.no_grad()
def _val_loss(strategy: Any, ema: Any, val_x: torch.Tensor, seed: int, device: torch.device) -> float:
    """Loss of the EMA weights on the fixed val clips with fixed noise (training RNG untouched)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ema.swap(strategy.ema_tensors()):
        torch.manual_seed(seed + 12345)
        with strategy.autocast():
            loss, _ = strategy.model(val_x)
    return dist_mean(float(loss), device)


@torch.no_grad()
def _latent_use(strategy: Any, ema: Any, val_x: torch.Tensor, seed: int, device: torch.device) -> dict[str, float]:
    """Stage-1 latent-use telemetry of the EMA weights: val losses with the clips' own and a shuffled latent."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ema.swap(strategy.ema_tensors()):
        torch.manual_seed(seed + 54321)  # fixed noise: the probe is comparable across steps
        with strategy.autocast():
            losses = strategy.model(val_x, probe=True)
    # every rank holds the same keys (same model, same val batch size), so the reductions line up
    return {f"val_{k}": dist_mean(float(v), device) for k, v in sorted(losses.items())}


@torch.no_grad()
def _quality_score(run: WorkerRun, strategy: Any, ema: Any, val_x: torch.Tensor) -> dict[str, float]:
    """Rank 0: the stage's quality score of the EMA weights on the val clips (collective: all ranks call).

    Only rank 0's metrics reach Ray Train and Tune, so the other ranks skip the sampling.
    """
    with torch.random.fork_rng(devices=[val_x.device] if val_x.device.type == "cuda" else []):
        plain = _plain_ema_model(strategy, ema, run.model_config)
        if run.rank != 0 or plain is None:
            return {}
        torch.manual_seed(run.cfg.seed + 24680)  # fixed noise: the score is comparable across steps and trials
        return run.stage.quality_score(plain.to(val_x.device), val_x, run.data)


def _plain_ema_model(strategy: Any, ema: Any, model_config: dict) -> nn.Module | None:
    """Rank 0: a plain copy of the model holding the gathered EMA weights (collective: all ranks call)."""
    state = strategy.gather_ema_state(ema)
    if state is None:
        return None
    plain = build_model(model_config)
    plain.load_state_dict(strip_prefix(state, "model."))
    return plain.eval()


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v.detach().cpu() for k, v in state.items()}


@torch.no_grad()
def _log_media(run: WorkerRun, strategy: Any, ema: Any, val_x: torch.Tensor, step: int, wandb_run: Any) -> None:
    """Rank 0 writes the stage's preview videos from the EMA weights (collective: all ranks call)."""
    # building and sampling the preview model draws random numbers: keep them out of the training RNG stream
    with torch.random.fork_rng(devices=[val_x.device] if val_x.device.type == "cuda" else []):
        plain = _plain_ema_model(strategy, ema, run.model_config)
        if run.rank != 0 or plain is None:
            return
        try:
            run.stage.log_media(plain.to(val_x.device), val_x, run.data, run.run_dir / "media", step, run.cfg.logger,
                                wandb_run)
        except Exception as exc:  # noqa: BLE001 - a failed preview must not kill a training run
            log.warning("media logging failed at step %d (the run goes on without this preview): %s: %s", step,
                        type(exc).__name__, exc)


def _export(run: WorkerRun, strategy: Any, ema: Any, step: int, last_metrics: dict[str, Any]) -> None:
    """Rank 0 writes ``export/model.pt``: the gathered EMA weights, model config and run facts (collective)."""
    state = strategy.gather_ema_state(ema)
    if run.rank != 0 or state is None:
        return
    meta = {"stage": run.stage.name, "step": step, "data": run.data.to_dict(), "metrics": last_metrics}
    export_model(run.run_dir / "export" / "model.pt", strip_prefix(state, "model."), run.model_config, meta)
