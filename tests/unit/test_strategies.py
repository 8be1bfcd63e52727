"""Strategies on 2 gloo CPU processes: loss falls, exact resume, EMA on shards == EMA on gathered weights.

One spawn of two ranks runs every scenario for every strategy (process start-up dominates the cost); each
scenario's result or traceback is collected on rank 0 and asserted by its own parametrized test.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cadiff.config import StrategyConfig, TrainerConfig
from cadiff.errors import CheckpointError, ConfigError
from cadiff.testing.faults import corrupt_checkpoint_file
from cadiff.train.checkpoint import CheckpointManager, resume
from cadiff.train.ema import EMA
from cadiff.train.step import train_step
from cadiff.train.strategies import build_strategy, deepspeed_config, warmup_cosine_lr

WORLD = 2
HALF = 3  # steps before / after the checkpoint
STRATEGIES = {"ddp": ("ddp", 0), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3), "fsdp2": ("fsdp2", 0)}
# DDP replays the same float ops in the same order; sharded strategies reduce in other groupings
RESUME_TOL = {"ddp": 1e-6, "zero1": 1e-5, "zero2": 1e-5, "zero3": 1e-5, "fsdp2": 1e-5}
BF16 = ("ddp", "zero3", "fsdp2")


# ---------------------------------------------------------------------------------------------------------
# toy model: shard_units() + training_loss(), wrapped so forward is the loss (as the training loop does)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.fc(self.norm(h)))


class Toy(nn.Module):
    def __init__(self, width: int = 8, noise_std: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.out = nn.Linear(width, 4)
        self.noise_std = noise_std

    def shard_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # input noise draws from the global RNG, so exact resume also needs the RNG state restored
        noisy = x + self.noise_std * torch.randn_like(x)
        loss = F.mse_loss(self(noisy).float(), 0.5 * x.flip(-1))
        return loss, {}


class TrainLoss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.model.training_loss(x)

    def shard_units(self) -> list[nn.Module]:
        return self.model.shard_units()


def make_model(seed: int, noise_std: float = 0.1) -> TrainLoss:
    torch.manual_seed(seed)
    return TrainLoss(Toy(noise_std=noise_std))


def make_cfgs(label: str, **trainer) -> tuple[StrategyConfig, TrainerConfig]:
    name, stage = STRATEGIES.get(label, ("single", 0))
    base = {"max_steps": 2 * HALF, "lr": 2e-2, "warmup_steps": 2, "min_lr_ratio": 0.1, "grad_clip": 1.0, "weight_decay": 0.01}
    return StrategyConfig(name=name, zero_stage=stage), TrainerConfig(**{**base, **trainer})


def batch(rank: int, step: int, micro: int = 0, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1000 * step + 10 * micro + rank))


def train(strategy, rank: int, start: int, stop: int, ema=None, data=batch, on_step=None, norms=None) -> list[float]:
    """The loop's own step (``cadiff.train.step.train_step``) over ``data(rank, step, micro)`` batches."""
    losses = []
    for step in range(start, stop):
        done = train_step(strategy, lambda micro, step=step: data(rank, step, micro), step, ema=ema)
        if norms is not None:
            norms.append(float(done.grad_norm))
        if on_step is not None:
            on_step(step + 1)
        losses.append(float(done.loss))
    return losses


def strip(state: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def seeded_loss(fn, x: torch.Tensor) -> float:
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)
        return float(fn(x)[0])


# ---------------------------------------------------------------------------------------------------------
# scenarios (run on every rank; return rank 0's observations)


def scenario_resume_ema(label: str, rank: int, work: Path) -> dict:
    """A: 2*HALF steps uninterrupted (with an EMA-swapped val pass midway); B: HALF, save, fresh model, load, HALF."""
    scfg, tcfg = make_cfgs(label)
    out: dict = {}

    # A: uninterrupted, with a reference EMA over the gathered full weights (rank 0)
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    ema = EMA(strategy.ema_tensors(), decay=0.8)
    full0 = strategy.full_state_dict()
    param_names = [n for n, _ in strategy.module.named_parameters()]
    ref = EMA({k: full0[k] for k in param_names}, decay=0.8) if rank == 0 else None
    out["sharded_numel"] = sum(t.numel() for t in strategy.ema_tensors().values())
    out["ema_dtypes"] = sorted({str(t.dtype) for t in strategy.ema_tensors().values()})

    def ref_update(step: int) -> None:
        full = strategy.full_state_dict()
        if ref is not None:
            ref.update({k: full[k] for k in param_names}, step)

    torch.manual_seed(100 + rank)
    losses = train(strategy, rank, 0, HALF, ema, on_step=ref_update)
    # validation protocol of the loop: EMA swapped in, forward, swapped out - then training continues
    xval = batch(0, 999)
    ema_state = strategy.gather_ema_state(ema)
    live_state = strategy.full_state_dict()
    with ema.swap(strategy.ema_tensors()):
        swapped = seeded_loss(strategy.model, xval)
    restored = seeded_loss(strategy.model, xval)
    if rank == 0:
        with torch.random.fork_rng():  # building the plain model must not advance the training RNG
            plain = Toy()
        plain.load_state_dict(strip(ema_state))
        out["val_swapped"], out["val_plain_ema"] = swapped, seeded_loss(plain.training_loss, xval)
        plain.load_state_dict(strip(live_state))
        out["val_restored"], out["val_plain_live"] = restored, seeded_loss(plain.training_loss, xval)
    losses += train(strategy, rank, HALF, 2 * HALF, ema, on_step=ref_update)
    out["losses"] = losses
    out["final_a"] = strategy.full_state_dict()
    out["ema_a"] = strategy.gather_ema_state(ema)
    out["ema_ref"] = dict(ref.shadow) if ref is not None else None

    # B: interrupted at HALF through an atomic checkpoint folder, resumed into a differently initialized model
    manager = CheckpointManager(work, num_to_keep=1)
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    ema = EMA(strategy.ema_tensors(), decay=0.8)
    torch.manual_seed(100 + rank)
    train(strategy, rank, 0, HALF, ema)
    tmp = manager.tmp_dir(HALF)
    extra = {"step": HALF, "ema": ema.state_dict(), "data_position": HALF,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    strategy.save(tmp, extra)
    manager.commit(tmp, HALF)
    del strategy, ema

    torch.manual_seed(12345)  # resume must restore the RNG, not inherit it
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(1), torch.device("cpu"))
    ema = EMA(strategy.ema_tensors(), decay=0.8)
    loaded = strategy.load(manager.latest())
    ema.load_state_dict(loaded["ema"])
    torch.set_rng_state(loaded["rng"]["torch"])
    np.random.set_state(loaded["rng"]["numpy"])
    out["resumed_step"] = loaded["step"]
    train(strategy, rank, loaded["step"], 2 * HALF, ema)
    out["final_b"] = strategy.full_state_dict()
    out["ema_b"] = strategy.gather_ema_state(ema)
    out["ckpt_files"] = sorted(p.name for p in manager.latest().iterdir())
    return out if rank == 0 else {}


def scenario_grad_accum(label: str, rank: int, work: Path) -> dict:
    """grad_accum=2 over two half batches == one step on the whole batch (noise-free loss, clipping active)."""
    finals, norms = [], []
    for accum in (2, 1):
        scfg, tcfg = make_cfgs(label, grad_accum=accum, grad_clip=0.05)
        strategy = build_strategy(scfg, tcfg)
        strategy.setup(make_model(0, noise_std=0.0), torch.device("cpu"))

        def data(r: int, step: int, micro: int, accum: int = accum) -> torch.Tensor:
            halves = [batch(r, step, m, 2) for m in range(2)]
            return halves[micro] if accum == 2 else torch.cat(halves)

        norms.append([])
        train(strategy, rank, 0, 2, data=data, norms=norms[-1])
        finals.append(strategy.full_state_dict())
    return {"accum2": finals[0], "accum1": finals[1], "norms2": norms[0], "norms1": norms[1]} if rank == 0 else {}


def scenario_merged_dirs(label: str, rank: int, work: Path) -> dict:
    """Ray Train layout: each rank saves into its own folder, the folders are merged, every rank loads the merge."""
    scfg, tcfg = make_cfgs(label)
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    ema = EMA(strategy.ema_tensors(), decay=0.8)
    torch.manual_seed(100 + rank)
    train(strategy, rank, 0, 2, ema)
    strategy.save(work / f"rank{rank}", {"step": 2, "ema": ema.state_dict()})
    before, ema_before = strategy.full_state_dict(), strategy.gather_ema_state(ema)
    if rank == 0:
        for r in range(WORLD):
            shutil.copytree(work / f"rank{r}", work / "merged", dirs_exist_ok=True)
    dist.barrier()
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(1), torch.device("cpu"))
    ema = EMA(strategy.ema_tensors(), decay=0.8)
    ema.load_state_dict(strategy.load(work / "merged")["ema"])
    after, ema_after = strategy.full_state_dict(), strategy.gather_ema_state(ema)
    return {"before": before, "after": after, "ema_before": ema_before, "ema_after": ema_after} if rank == 0 else {}


def scenario_resume_fallback(label: str, rank: int, work: Path) -> dict:
    """Step 3 fails rank 0's sha256 check; step 2 (a manifest without sha256) fails to load on rank 1 alone:
    both ranks resume step 1, and the two damaged checkpoints are set aside."""
    scfg, tcfg = make_cfgs(label)
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    manager = CheckpointManager(work, num_to_keep=3)
    for step in (1, 2, 3):
        train(strategy, rank, step - 1, step)
        tmp = manager.tmp_dir(step)
        strategy.save(tmp, {"step": step, "ema": {}, "rng": {"torch": torch.get_rng_state()}})
        manager.commit(tmp, step)
    if rank == 0:
        corrupt_checkpoint_file(manager.step_dir(3) / "extra_rank00001.pt", "tensor_data")
        marker = manager.step_dir(2) / "COMPLETE"
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "sha256"}))
        corrupt_checkpoint_file(manager.step_dir(2) / "extra_rank00001.pt", "header")
    dist.barrier()
    folder, step = resume(manager.candidates(), lambda d: strategy.load(d)["step"])
    steps: list = [None] * WORLD
    dist.all_gather_object(steps, (folder.name, step))
    return {"steps": steps, "folders": sorted(p.name for p in manager.root.iterdir())} if rank == 0 else {}


def scenario_bf16(label: str, rank: int, work: Path) -> dict:
    """bf16 mixed precision trains with finite losses while the tracked weights stay fp32."""
    scfg, tcfg = make_cfgs(label, precision="bf16")
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    torch.manual_seed(100 + rank)
    losses = train(strategy, rank, 0, 3)
    return {"losses": losses, "dtypes": sorted({str(t.dtype) for t in strategy.ema_tensors().values()})}


def scenario_warnings(label: str, rank: int, work: Path) -> dict:
    """FutureWarnings (torch deprecations) raised while a strategy sets up, trains two steps and gathers EMA."""
    scfg, tcfg = make_cfgs(label)
    if scfg.name == "deepspeed":
        from deepspeed.comm import comm as ds_comm

        ds_comm.cdb = None  # a fresh DeepSpeed backend, as in a new worker process (earlier scenarios made one)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        strategy = build_strategy(scfg, tcfg)
        strategy.setup(make_model(0), torch.device("cpu"))
        ema = EMA(strategy.ema_tensors(), decay=0.8)
        train(strategy, rank, 0, 2, ema)
        strategy.gather_ema_state(ema)
    return {"future_warnings": sorted({str(w.message) for w in caught if issubclass(w.category, FutureWarning)})}


def _worker(rank: int, world: int, port: int, work: str, jobs: list[tuple[str, str]]) -> None:
    torch.set_num_threads(1)
    # a failed collective on one rank must not hang the other for the default 30 minutes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    scenarios = {"resume_ema": scenario_resume_ema, "grad_accum": scenario_grad_accum, "merged_dirs": scenario_merged_dirs,
                 "bf16": scenario_bf16, "resume_fallback": scenario_resume_fallback, "warnings": scenario_warnings}
    results = {}
    for label, kind in jobs:
        t0 = time.perf_counter()
        try:
            results[f"{label}/{kind}"] = scenarios[kind](label, rank, Path(work) / f"{label}_{kind}")
        except Exception:
            results[f"{label}/{kind}"] = {"error": f"rank {rank}: {traceback.format_exc()}"}
        results[f"{label}/{kind}"]["seconds"] = time.perf_counter() - t0
    if rank == 0:
        torch.save(results, Path(work) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(work: Path, jobs: list[tuple[str, str]], timeout_s: float = 240.0) -> dict:
    """Spawn 2 gloo ranks running ``jobs``; return rank 0's results (kill the ranks on timeout)."""
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(work), jobs), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"2-rank strategy workers did not finish within {timeout_s:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return torch.load(work / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("strategies")
    jobs = [(label, kind) for label in STRATEGIES for kind in ("resume_ema", "grad_accum", "merged_dirs", "warnings")]
    jobs += [(label, "bf16") for label in BF16]
    jobs.append(("ddp", "resume_fallback"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_two_ranks(work, jobs)


def result(dist_results: dict, key: str) -> dict:
    res = dist_results[key]
    assert "error" not in res, res.get("error")
    return res


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= atol, f"{k}: max |diff| {diff:.3g} > {atol}"


# ---------------------------------------------------------------------------------------------------------
# distributed tests


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_loss_falls(dist_results, label):
    losses = result(dist_results, f"{label}/resume_ema")["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_training_raises_no_deprecation_warnings(dist_results, label):
    """DeepSpeed binds collectives torch 2.13 deprecates; the strategy points it at their replacements."""
    assert result(dist_results, f"{label}/warnings")["future_warnings"] == []


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_resume_equals_uninterrupted(dist_results, label):
    res = result(dist_results, f"{label}/resume_ema")
    assert res["resumed_step"] == HALF
    assert_states_close(res["final_a"], res["final_b"], RESUME_TOL[label])
    assert_states_close(res["ema_a"], res["ema_b"], RESUME_TOL[label])
    # and training actually moved the weights away from a fresh init
    assert not torch.allclose(res["final_a"]["model.out.weight"], make_model(0).model.out.weight.detach())


def test_ranks_agree_on_the_checkpoint_to_fall_back_to(dist_results):
    res = result(dist_results, "ddp/resume_fallback")
    assert res["steps"] == [("step_00000001", 1)] * WORLD
    assert res["folders"] == [".corrupt_step_00000002", ".corrupt_step_00000003", "step_00000001"]


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_ema_on_local_tensors_equals_ema_of_gathered_weights(dist_results, label):
    res = result(dist_results, f"{label}/resume_ema")
    ema = res["ema_a"]
    assert_states_close({k: ema[k] for k in res["ema_ref"]}, res["ema_ref"], 1e-6)
    assert res["ema_dtypes"] == ["torch.float32"]
    full = sum(v.numel() for v in res["ema_ref"].values())
    if label in ("zero3", "fsdp2"):  # EMA tracks this rank's shard, not a full copy
        assert res["sharded_numel"] < full
    else:
        assert res["sharded_numel"] == full
    # EMA differs from the live weights (decay 0.8 over 6 steps), so the comparison above is not vacuous
    assert not torch.allclose(ema["model.out.weight"], res["final_a"]["model.out.weight"])


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_ema_swap_forward_uses_ema_and_restores(dist_results, label):
    res = result(dist_results, f"{label}/resume_ema")
    assert res["val_swapped"] == pytest.approx(res["val_plain_ema"], rel=1e-5)
    assert res["val_restored"] == pytest.approx(res["val_plain_live"], rel=1e-5)
    assert res["val_swapped"] != pytest.approx(res["val_restored"], rel=1e-4)


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_checkpoint_layout(dist_results, label):
    files = result(dist_results, f"{label}/resume_ema")["ckpt_files"]
    assert {"COMPLETE", "strategy.json", "extra_rank00000.pt", "extra_rank00001.pt"} <= set(files)
    expected = {"ddp": "model.pt", "fsdp2": "dcp"}.get(label, "deepspeed")
    assert expected in files


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_grad_accumulation_matches_full_batch(dist_results, label):
    res = result(dist_results, f"{label}/grad_accum")
    assert_states_close(res["accum2"], res["accum1"], 1e-5)


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_strategies_agree_on_grad_norm_and_weights(dist_results, label):
    ref, res = result(dist_results, "ddp/grad_accum"), result(dist_results, f"{label}/grad_accum")
    assert res["norms1"] == pytest.approx(ref["norms1"], rel=1e-5)
    assert res["norms2"] == pytest.approx(ref["norms1"], rel=1e-5)
    assert min(ref["norms1"]) > 0.05  # clipping was active
    assert_states_close(res["accum1"], ref["accum1"], 1e-5)


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_load_from_per_rank_folders_merged(dist_results, label):
    res = result(dist_results, f"{label}/merged_dirs")
    assert_states_close(res["before"], res["after"], 0.0)
    assert_states_close(res["ema_before"], res["ema_after"], 0.0)


@pytest.mark.parametrize("label", BF16)
def test_bf16_trains_with_fp32_master_weights(dist_results, label):
    res = result(dist_results, f"{label}/bf16")
    assert all(math.isfinite(v) for v in res["losses"])
    assert res["dtypes"] == ["torch.float32"]


# ---------------------------------------------------------------------------------------------------------
# in-process tests (strategy=single, pure functions, config errors)


def test_lr_schedule_values():
    lr = lambda s: warmup_cosine_lr(s, 1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)  # noqa: E731
    assert [lr(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr(4) == pytest.approx(1.0)
    assert lr(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert lr(13) == pytest.approx(0.1)
    assert lr(50) == pytest.approx(0.1)
    values = [lr(s) for s in range(4, 14)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert warmup_cosine_lr(0, 2e-4, 0, 10, 0.5) == pytest.approx(2e-4)


def test_single_applies_lr_and_resumes_exactly(tmp_path):
    scfg, tcfg = make_cfgs("single", max_steps=6, warmup_steps=3)
    seen_lrs = []

    def run(start, stop, strategy):
        for step in range(start, stop):
            with strategy.accumulation_context(True), strategy.autocast():
                loss, _ = strategy.model(batch(0, step))
            strategy.backward(loss)
            norm = strategy.clip_and_step(step)
            assert math.isfinite(norm) and norm > 0
            seen_lrs.append(strategy.optimizer.param_groups[0]["lr"])

    straight = build_strategy(scfg, tcfg)
    straight.setup(make_model(0), torch.device("cpu"))
    torch.manual_seed(7)
    run(0, 6, straight)
    assert seen_lrs == pytest.approx([straight.lr_at(s) for s in range(6)])

    first = build_strategy(scfg, tcfg)
    first.setup(make_model(0), torch.device("cpu"))
    torch.manual_seed(7)
    run(0, 3, first)
    first.save(tmp_path / "ck", {"step": 3, "ema": {}, "rng": {"torch": torch.get_rng_state()}})
    torch.manual_seed(99)
    second = build_strategy(scfg, tcfg)
    second.setup(make_model(5), torch.device("cpu"))
    extra = second.load(tmp_path / "ck")
    torch.set_rng_state(extra["rng"]["torch"])
    run(extra["step"], 6, second)
    assert_states_close(straight.full_state_dict(), second.full_state_dict(), 0.0)


def test_clip_and_step_requires_grad_accum_backwards():
    scfg, tcfg = make_cfgs("single", grad_accum=2)
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    loss, _ = strategy.model(batch(0, 0))
    strategy.backward(loss)
    with pytest.raises(RuntimeError, match="grad_accum=2"):
        strategy.clip_and_step(0)


def test_load_rejects_other_strategy_and_missing_files(tmp_path):
    scfg, tcfg = make_cfgs("single")
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="strategy.json"):
        strategy.load(tmp_path)
    strategy.save(tmp_path / "ck", {"step": 0, "ema": {}})
    (tmp_path / "ck" / "strategy.json").write_text('{"strategy": "fsdp2", "zero_stage": 0, "world_size": 1}')
    with pytest.raises(CheckpointError, match="strategy='fsdp2'"):
        strategy.load(tmp_path / "ck")
    strategy.save(tmp_path / "ck2", {"step": 0, "ema": {}})
    (tmp_path / "ck2" / "optim.pt").unlink()
    with pytest.raises(CheckpointError, match="optim.pt"):
        strategy.load(tmp_path / "ck2")


def test_save_rejects_unsafe_extra(tmp_path):
    scfg, tcfg = make_cfgs("single")
    strategy = build_strategy(scfg, tcfg)
    strategy.setup(make_model(0), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="extra.bad"):
        strategy.save(tmp_path, {"step": 1, "ema": {}, "bad": object()})


def test_bad_strategy_configs():
    tcfg = TrainerConfig()
    with pytest.raises(ConfigError, match="strategy.name"):
        build_strategy(StrategyConfig(name="horovod"), tcfg)
    with pytest.raises(ConfigError, match="zero_stage"):
        build_strategy(StrategyConfig(name="deepspeed", zero_stage=4), tcfg)
    with pytest.raises(ConfigError, match="process group"):
        build_strategy(StrategyConfig(name="ddp"), tcfg).setup(make_model(0), torch.device("cpu"))


def test_deepspeed_config_follows_trainer():
    cfg = deepspeed_config(StrategyConfig(name="deepspeed", zero_stage=3), TrainerConfig(grad_accum=4, grad_clip=0.5, precision="bf16"), 2)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert (cfg["gradient_accumulation_steps"], cfg["gradient_clipping"], cfg["train_micro_batch_size_per_gpu"]) == (4, 0.5, 2)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in deepspeed_config(StrategyConfig(name="deepspeed", zero_stage=1), TrainerConfig(), 1)


def test_auto_precision_resolves_from_the_hardware(monkeypatch):
    from cadiff.train import strategies

    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
    plain = "processor\t: 0\nflags\t\t: fpu avx2 avx512f\n"
    assert strategies.cpu_has_fast_bf16(amx) and not strategies.cpu_has_fast_bf16(plain)
    assert strategies.cpu_has_fast_bf16("flags : sse avx512_bf16\n") and not strategies.cpu_has_fast_bf16("")
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(strategies, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert strategies.resolve_precision("auto", torch.device("cpu")) == expected
        strategy = build_strategy(StrategyConfig(name="single"), TrainerConfig(precision="auto"))
        strategy.setup(make_model(0), torch.device("cpu"))
        assert strategy.precision == expected
        assert torch.is_autocast_enabled("cpu") is False
        with strategy.autocast():
            assert torch.is_autocast_enabled("cpu") is (expected == "bf16")
        ds = deepspeed_config(StrategyConfig(name="deepspeed", zero_stage=1), TrainerConfig(precision="auto"), 1,
                              strategy.precision)
        assert ("torch_autocast" in ds) is (expected == "bf16")
    # explicit settings are never second-guessed
    assert strategies.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert strategies.resolve_precision("bf16", torch.device("cpu")) == "bf16"
