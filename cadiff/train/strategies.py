"""Distribution strategies: one interface over single-process, DDP, DeepSpeed ZeRO-1/2/3 and FSDP2.

Parallelism is applied to a plain model by small functions (``apply_ddp``, ``apply_fsdp2``,
``deepspeed_config``), torchtitan style; the training loop, EMA and checkpoint code only talk to a
``Strategy``. The module handed to ``setup`` must route ``forward`` to its training loss (the loop's
``TrainingModule``) so that every wrapper's hooks - DDP's reducer, ZeRO-3 parameter gathers, FSDP2
all-gathers - run around the loss computation. FSDP2 additionally needs ``shard_units()`` on it.

Every strategy keeps fp32 master weights in the module's parameters (bf16 is autocast, FSDP2's
``MixedPrecisionPolicy`` or DeepSpeed's ``torch_autocast``), so EMA tracks fp32 values everywhere:
full parameters (single/DDP/ZeRO-1/2) or this rank's shards (FSDP2 local shards, ZeRO-3 ``ds_tensor``).

Checkpoint folder layout written by ``save`` (all ranks call it; a folder may be merged from per-rank
folders, as Ray Train does):
  strategy.json             rank 0: strategy name, ZeRO stage, world size (checked on load)
  extra_rank<r>.pt          every rank: step, RNG states, data position, EMA (this rank's shard when
                            sharded; only rank 0 for replicated EMA)
  model.pt, optim.pt        single/DDP, rank 0
  deepspeed/...             DeepSpeed ``engine.save_checkpoint`` (every rank)
  dcp/...                   FSDP2, torch.distributed.checkpoint (every rank)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cadiff.config import validate_strategy
from cadiff.errors import CheckpointError, ConfigError
from cadiff.runtime.exports import safe_load

log = logging.getLogger(__name__)

MANIFEST = "strategy.json"
DEEPSPEED_TAG = "deepspeed"
DCP_DIR = "dcp"


# ---------------------------------------------------------------------------------------------------------
# pure helpers


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR of 0-based optimizer step ``step``: linear warmup to ``base_lr``, then cosine decay to ``min_lr_ratio*base_lr``.

    Warmup: Goyal et al. 2017 (arXiv:1706.02677); cosine decay: Loshchilov & Hutter 2017 (arXiv:1608.03983).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    min_lr = base_lr * min_lr_ratio
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_adamw(params: Any, trainer_cfg: Any) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) with the trainer's lr, betas and weight decay."""
    return torch.optim.AdamW(
        params, lr=float(trainer_cfg.lr), betas=tuple(float(b) for b in trainer_cfg.betas), weight_decay=float(trainer_cfg.weight_decay)
    )


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)


def _barrier() -> None:
    if _dist_on() and dist.get_world_size() > 1:
        dist.barrier()


def to_safe(obj: Any, where: str = "extra") -> Any:
    """Convert a checkpoint payload to types ``torch.load(weights_only=True)`` accepts (numpy -> lists/scalars)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {k: to_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise CheckpointError(
        f"checkpoint value '{where}' has type {type(obj).__name__}: expected tensors, numbers, strings, "
        "None, lists, tuples or dicts (loadable with torch.load(weights_only=True))"
    )


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _cpu_clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: on CPU ``.cpu()`` aliases, and callers read these after EMA values are swapped back out
    return {k: v.detach().clone().cpu() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------------
# apply functions (plain model in, parallel model out)


def apply_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """Wrap ``module`` (already on ``device``) in DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def apply_fsdp2(module: nn.Module, device: torch.device, bf16: bool, reshard_after_forward: bool) -> nn.Module:
    """``fully_shard`` each of ``module.shard_units()`` then the root (params stay fp32 shards; bf16 all-gathers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not hasattr(module, "shard_units"):
        raise ConfigError(
            f"strategy.name=fsdp2: model {type(module).__name__} has no shard_units() method; expected a list of "
            "blocks to shard one by one"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute, fp32 gradient reduction: the torchtitan default for FSDP2 mixed precision
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for unit in module.shard_units():
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=mp_policy)
    return module


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU multiplies bf16 in hardware (Intel AMX-BF16 or AVX512-BF16), read from /proc/cpuinfo.

    Elsewhere (no flags, or not Linux) oneDNN emulates bf16 and autocast is slower than fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """``trainer.precision`` as run on ``device``: ``auto`` is bf16 autocast where bf16 pays, else fp32.

    bf16 pays on CUDA devices that support it and on CPUs with AMX/AVX512-BF16 (benchmarks/model_step.py:
    the fp32 step of the default DiffAE is 2.1x the bf16 step on one such CPU).
    """
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def deepspeed_config(strategy_cfg: Any, trainer_cfg: Any, micro_batch_size: int,
                     precision: str | None = None) -> dict[str, Any]:
    """DeepSpeed config dict for ZeRO stage ``strategy_cfg.zero_stage`` (https://www.deepspeed.ai/docs/config-json/)."""
    zero: dict[str, Any] = {"stage": int(strategy_cfg.zero_stage)}
    if strategy_cfg.zero_stage == 3:
        # No persistent (never-partitioned) small params: EMA swaps values into ``ds_tensor`` partitions and
        # gathers from them, which a persistent full copy would silently bypass.
        zero["stage3_param_persistence_threshold"] = 0
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(trainer_cfg.grad_accum),
        "gradient_clipping": float(trainer_cfg.grad_clip),
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if (precision or trainer_cfg.precision) == "bf16":
        # torch autocast keeps fp32 weights in the module (EMA and exports stay fp32); DeepSpeed's "bf16" mode
        # would turn the module itself to bf16
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


# ---------------------------------------------------------------------------------------------------------
# strategies


class Strategy:
    """Single-process training; the base of every strategy (see the module docstring for the interface)."""

    name = "single"
    ema_replicated = True  # every rank holds the same full EMA

    def __init__(self, strategy_cfg: Any, trainer_cfg: Any, micro_batch_size: int = 1) -> None:
        self.strategy_cfg = strategy_cfg
        self.trainer_cfg = trainer_cfg
        self.micro_batch_size = micro_batch_size
        self.grad_accum = int(trainer_cfg.grad_accum)
        self.rank, self.world_size = _rank_world()
        self.device = torch.device("cpu")
        self.precision = resolve_precision(trainer_cfg.precision, self.device)
        self.model: nn.Module | None = None
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._micro = 0

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Move ``model`` to ``device``, wrap it for this strategy and build AdamW; sets ``.model``/``.module``."""
        self.device = torch.device(device)
        self.precision = resolve_precision(self.trainer_cfg.precision, self.device)
        self.rank, self.world_size = _rank_world()
        self.module = model
        self._wrap(model)

    def _wrap(self, model: nn.Module) -> None:
        self.module = model.to(self.device)
        self.model = self.module
        self.optimizer = build_adamw(self.module.parameters(), self.trainer_cfg)

    def _require_process_group(self) -> None:
        if not _dist_on():
            raise ConfigError(
                f"strategy.name={self.name}: needs an initialized torch.distributed process group "
                "(run under Ray Train / torchrun), or use strategy=single"
            )

    # -- training step ----------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Learning rate applied at 0-based optimizer step ``step``."""
        t = self.trainer_cfg
        return warmup_cosine_lr(step, float(t.lr), int(t.warmup_steps), int(t.max_steps), float(t.min_lr_ratio))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the resolved ``trainer.precision`` is bf16, else a no-op context."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulation_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Wrap forward+backward of a micro-batch; gradient sync is skipped unless ``last``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss, scaled so accumulated gradients average over micro-batches."""
        (loss / self.grad_accum).backward()
        self._micro += 1

    def _check_micro_steps(self) -> None:
        if self._micro != self.grad_accum:
            raise RuntimeError(
                f"clip_and_step after {self._micro} backward calls; trainer.grad_accum={self.grad_accum} expected"
            )
        self._micro = 0

    def _set_lr(self, step: int) -> None:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clip_and_step(self, step: int) -> torch.Tensor:
        """Apply the LR of ``step``, clip by ``trainer.grad_clip``, step and zero grads; returns the pre-clip grad norm
        (a 0-d tensor on the device: reading it is the caller's host sync)."""
        self._check_micro_steps()
        self._set_lr(step)
        params = [p for p in self.module.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(total, "full_tensor"):  # FSDP2: a sharded norm, reduce it over ranks
            total = total.full_tensor()
        if self.trainer_cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, float(self.trainer_cfg.grad_clip), total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.detach()

    # -- EMA and full weights ---------------------------------------------------------------------------

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors EMA tracks on this rank (full fp32 parameters here)."""
        return {name: p.detach() for name, p in self.module.named_parameters()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Unsharded ``module.state_dict()`` on CPU on rank 0, None elsewhere (collective)."""
        return _cpu_clone_state(self.module.state_dict()) if self.rank == 0 else None

    def gather_ema_state(self, ema: Any) -> dict[str, torch.Tensor] | None:
        """Full EMA weights keyed like ``module.state_dict()`` on rank 0, None elsewhere (collective)."""
        with torch.no_grad(), ema.swap(self.ema_tensors()):
            return self.full_state_dict()

    # -- checkpoints ------------------------------------------------------------------------------------

    def rank_writes_checkpoint(self) -> bool:
        """Whether this rank writes files in ``save`` (every rank does: its RNG state lives in extra_rank<r>.pt)."""
        return True

    def save(self, ckpt_dir: str | os.PathLike, extra: dict[str, Any]) -> None:
        """Write model, optimizer and ``extra`` (step, EMA, RNG, data position) into ``ckpt_dir`` (collective)."""
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._save_model_optim(ckpt_dir)
        payload = dict(extra)
        if self.ema_replicated and self.rank != 0:
            payload.pop("ema", None)  # identical on every rank: rank 0's copy is enough
        torch.save(to_safe(payload), ckpt_dir / _extra_name(self.rank))
        if self.rank == 0:
            manifest = {"strategy": self.name, "zero_stage": int(self.strategy_cfg.zero_stage), "world_size": self.world_size}
            (ckpt_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _barrier()

    def load(self, ckpt_dir: str | os.PathLike) -> dict[str, Any]:
        """Restore model and optimizer from ``ckpt_dir``; returns this rank's ``extra`` (collective for DeepSpeed
        and FSDP2). No barrier at the end: a rank that fails here must meet the others in the agreement of
        ``checkpoint.resume``, not in a barrier they never reach."""
        ckpt_dir = Path(ckpt_dir)
        self._check_manifest(ckpt_dir)
        self._load_model_optim(ckpt_dir)
        extra = safe_load(ckpt_dir / _extra_name(self.rank))
        if "ema" not in extra:
            extra["ema"] = safe_load(ckpt_dir / _extra_name(0))["ema"]
        extra["ema"] = _to_device(extra["ema"], self.device)
        self._micro = 0
        return extra

    def _check_manifest(self, ckpt_dir: Path) -> None:
        path = ckpt_dir / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{ckpt_dir}': no {MANIFEST}; expected a folder written by Strategy.save")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint manifest '{path}' is unreadable ({exc}); expected JSON") from None
        mine = {"strategy": self.name, "zero_stage": int(self.strategy_cfg.zero_stage), "world_size": self.world_size}
        for key, value in mine.items():
            if manifest.get(key) != value:
                raise CheckpointError(
                    f"checkpoint '{ckpt_dir}' was written with {key}={manifest.get(key)!r}; resuming needs the same "
                    f"value (now {value!r}): use the same strategy and trainer.num_workers, or start a new run_name"
                )

    def _save_model_optim(self, ckpt_dir: Path) -> None:
        if self.rank == 0:
            torch.save(to_safe(self.module.state_dict(), "model"), ckpt_dir / "model.pt")
            torch.save(to_safe(self.optimizer.state_dict(), "optim"), ckpt_dir / "optim.pt")

    def _load_model_optim(self, ckpt_dir: Path) -> None:
        state = safe_load(ckpt_dir / "model.pt", map_location=self.device)
        try:
            self.module.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint '{ckpt_dir / 'model.pt'}' does not fit the model: {exc}") from None
        self.optimizer.load_state_dict(safe_load(ckpt_dir / "optim.pt", map_location=self.device))


def _extra_name(rank: int) -> str:
    return f"extra_rank{rank:05d}.pt"


class DDPStrategy(Strategy):
    """DistributedDataParallel: replicated weights, gradients all-reduced on the last micro-batch."""

    name = "ddp"

    def _wrap(self, model: nn.Module) -> None:
        self._require_process_group()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.module = model.to(self.device)
        self.model = apply_ddp(self.module, self.device, bool(self.strategy_cfg.find_unused_parameters))
        self.optimizer = build_adamw(self.module.parameters(), self.trainer_cfg)

    def accumulation_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.model.no_sync()


class FSDP2Strategy(Strategy):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded on dim 0 over ranks."""

    name = "fsdp2"
    ema_replicated = False

    def _wrap(self, model: nn.Module) -> None:
        self._require_process_group()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model = model.to(self.device)
        bf16 = self.precision == "bf16"
        self.module = apply_fsdp2(model, self.device, bf16, bool(self.strategy_cfg.reshard_after_forward))
        self.model = self.module
        self.optimizer = build_adamw(self.module.parameters(), self.trainer_cfg)
        self.module.register_forward_hook(self._after_forward)

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            self._reshard_all()

    def _reshard_all(self) -> None:
        # FSDP2 keeps the root (and units with reshard_after_forward=False) unsharded after forward, for the
        # backward. Without a backward (validation under no_grad, EMA swapped in) the next forward would
        # reuse those full params - stale once EMA values are swapped out of the shards - so drop them.
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @contextlib.contextmanager
    def accumulation_context(self, last: bool) -> Iterator[None]:
        self._reshard_all()
        self.module.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's local shards (``DTensor.to_local()``, sharing storage with the parameters)."""
        self._reshard_all()
        return {name: p.detach().to_local() for name, p in self.module.named_parameters()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._reshard_all()
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _cpu_clone_state(state) if self.rank == 0 else None

    def _save_model_optim(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self._reshard_all()
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        (ckpt_dir / DCP_DIR).mkdir(parents=True, exist_ok=True)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(ckpt_dir / DCP_DIR))

    def _load_model_optim(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = ckpt_dir / DCP_DIR
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"checkpoint '{path}': no DCP .metadata; expected an FSDP2 checkpoint written by save")
        self._reshard_all()
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO stage 1/2/3 with a torch AdamW; CPU runs use DeepSpeed's cpu accelerator over gloo."""

    name = "deepspeed"

    def __init__(self, strategy_cfg: Any, trainer_cfg: Any, micro_batch_size: int = 1) -> None:
        super().__init__(strategy_cfg, trainer_cfg, micro_batch_size)
        self.zero_stage = int(strategy_cfg.zero_stage)
        self.ema_replicated = self.zero_stage < 3
        self.engine: Any = None

    def _wrap(self, model: nn.Module) -> None:
        self._require_process_group()
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        if accelerator.split(":")[0] != self.device.type:
            raise ConfigError(
                f"strategy.name=deepspeed: DeepSpeed selected the '{accelerator}' accelerator but training runs on "
                f"'{self.device.type}'; set DS_ACCELERATOR={self.device.type} before starting the workers"
            )
        # DeepSpeed reads the local device index from LOCAL_RANK (torchrun and Ray Train set it)
        os.environ.setdefault("LOCAL_RANK", str(self.device.index or 0) if self.device.type == "cuda" else "0")
        model = model.to(self.device)
        self.optimizer = build_adamw(model.parameters(), self.trainer_cfg)
        config = deepspeed_config(self.strategy_cfg, self.trainer_cfg, self.micro_batch_size, self.precision)
        # DeepSpeed's communication backend, made as deepspeed.initialize makes it, so that its collectives are
        # switched before ZeRO-3 partitions the parameters (which gathers already)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        use_single_tensor_collectives()
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self.model = self.engine
        self.module = self.engine.module
        if self.zero_stage == 3:
            self.module.register_forward_hook(self._after_forward)

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            self._release_gathered()

    def _release_gathered(self) -> None:
        # ZeRO-3 keeps parameters it expects the backward to reuse gathered after forward. Without a backward
        # (validation under no_grad, EMA swapped in) the next forward and GatheredParameters would use
        # those full copies instead of the partitions - stale once EMA values are swapped out again.
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if any(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in self.module.parameters()):
            self.engine.empty_partition_cache()

    @contextlib.contextmanager
    def accumulation_context(self, last: bool) -> Iterator[None]:
        # DeepSpeed decides gradient reduction from its own micro-step counter (advanced in backward)
        if self.zero_stage == 3:
            self._release_gathered()
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # engine.backward divides by gradient_accumulation_steps itself; engine.step() on a non-boundary
        # micro-batch only advances DeepSpeed's micro-step counter, which decides when gradients are reduced
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.grad_accum:
            self.engine.step()

    def clip_and_step(self, step: int) -> torch.Tensor:
        self._check_micro_steps()
        self._set_lr(step)  # the ZeRO optimizer shares param_groups with the torch AdamW passed in
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # DeepSpeed computes it as a host float (its own sync)
        return torch.as_tensor(float("nan") if norm is None else norm).detach()

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """Full parameters for ZeRO-1/2; this rank's flat partition (``param.ds_tensor``) for ZeRO-3."""
        if self.zero_stage < 3:
            return super().ema_tensors()
        self._release_gathered()
        return {name: p.ds_tensor for name, p in self.module.named_parameters()}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage < 3:
            return super().full_state_dict()
        self._release_gathered()
        return _zero3_full_state_dict(self.module, self.rank)

    def _save_model_optim(self, ckpt_dir: Path) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)

    def _load_model_optim(self, ckpt_dir: Path) -> None:
        if not (ckpt_dir / DEEPSPEED_TAG).is_dir():
            raise CheckpointError(f"checkpoint '{ckpt_dir}': no '{DEEPSPEED_TAG}/' folder; expected a DeepSpeed checkpoint")
        load_path, _ = self.engine.load_checkpoint(
            str(ckpt_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"checkpoint '{ckpt_dir / DEEPSPEED_TAG}': DeepSpeed could not load it")


# DeepSpeed's torch backend slot -> torch's current single-tensor collective with the same arguments
_SINGLE_TENSOR_COLLECTIVES = {"all_gather_function": "all_gather_single",
                              "reduce_scatter_function": "reduce_scatter_single"}


def use_single_tensor_collectives() -> None:
    """Point DeepSpeed's torch backend at ``all_gather_single`` / ``reduce_scatter_single``.

    DeepSpeed (0.19) binds ``all_gather_into_tensor`` / ``reduce_scatter_tensor``, which torch 2.13 deprecates in
    favour of these (same arguments): every ZeRO step then raised a FutureWarning. Torch versions without the new
    names keep DeepSpeed's choice.
    """
    from deepspeed.comm import comm as ds_comm

    backend = ds_comm.cdb
    for slot, name in _SINGLE_TENSOR_COLLECTIVES.items():
        replacement = getattr(dist, name, None)
        if replacement is not None and getattr(backend, slot, None) is not None:
            setattr(backend, slot, replacement)


def _zero3_full_state_dict(module: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """Gather ZeRO-3 partitions one module at a time (bounded memory) into a CPU state dict on rank 0."""
    import deepspeed

    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None

    def visit(mod: nn.Module, prefix: str) -> None:
        params = list(mod.parameters(recurse=False))
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else contextlib.nullcontext()
        with gather:
            if state is not None:
                for name, p in mod.named_parameters(recurse=False):
                    state[prefix + name] = p.detach().clone().cpu()
                for name, b in mod.named_buffers(recurse=False):
                    if b is not None and name not in mod._non_persistent_buffers_set:
                        state[prefix + name] = b.detach().clone().cpu()
        for name, child in mod.named_children():
            visit(child, f"{prefix}{name}.")

    visit(module, "")
    return state


STRATEGIES: dict[str, type[Strategy]] = {"single": Strategy, "ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy,
                                          "fsdp2": FSDP2Strategy}


def build_strategy(strategy_cfg: Any, trainer_cfg: Any, micro_batch_size: int = 1) -> Strategy:
    """The Strategy named by ``strategy_cfg.name`` (the config schema's rules, ``validate_strategy``, apply)."""
    validate_strategy(strategy_cfg)
    return STRATEGIES[strategy_cfg.name](strategy_cfg, trainer_cfg, micro_batch_size)
