"""Model step benchmark: forward+backward time, FLOPs, FLOP/s vs. this machine's fp32 matmul, peak memory.

Cases: the default stage-1 DiffAE (``experiment=ae_default``: a constant-width encoder without blocks per level,
the upsampler mean head with one block per level) on one ``1x17x64x64`` and one ``1x65x64x64`` clip,
``diffae_blocks`` the default before it (one residual block per level in a widening encoder, two per level in the
upsampler), ``diffae_unet_head`` the default before that (the same blocks, ``model.mean_head=unet``; each replaced
by a model as good for about equal training time, ``docs/design.md``), and a small DiT (size S) on a batch
of latents, each eager, ``torch.compile`` of the whole networks, and ``torch.compile`` per block (each of
``shard_units()``) - the seed's open question of where compile pays; ``eager_store`` keeps the norm/FiLM/SiLU
activations instead of recomputing them in backward; ``eager_glibc_malloc`` leaves glibc's dynamic mmap threshold on
(every other mode sets the trainer's ``trainer.malloc_mmap_threshold_kb``, as training workers do:
:mod:`cadiff.runtime.memory`). Every case runs in its own process (clean peak RSS) with ``--threads`` torch threads;
the matmul FLOP/s is measured in that process right before the timed steps, so the ratio is robust to other load on
the machine. FLOPs are counted by ``torch.utils.flop_counter`` (convs, matmuls, attention; forward and backward on
meta tensors). Each DiffAE row is compared with the seed's step measured on the same machine kind
(``<repo>/../shared/anchors``), normalised by each side's own matmul rate (:mod:`cadiff.bench.anchors`).

    python benchmarks/model_step.py --quick     # eager 17-frame DiffAE + DiT, < 2 min on 2 cores
    python benchmarks/model_step.py             # all cases (~30 min on 2 shared cores: compilation dominates)
    python benchmarks/model_step.py --case diffae:65:eager --case diffae:65:compile_blocks_bf16   # rerun some rows
    python benchmarks/model_step.py --profile 17   # where one eager fp32 17-frame DiffAE step spends its time

Results: ``benchmarks/results/model_step.json`` and ``model_step.md``; ``--profile``: ``model_step_profile.json``
and ``model_step_profile.md`` (:mod:`cadiff.bench.step_profile`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.bench.anchors import DEFAULT_ANCHORS, load_anchors, normalised_speedup  # noqa: E402
from cadiff.errors import CadiffError  # noqa: E402
from cadiff.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("eager", "eager_store", "eager_glibc_malloc", "compile_model", "compile_blocks")
# stage-1 cases: the default DiffAE, the default before it (blocks in a widening encoder, two per upsampler level)
# and the one before that (the same blocks, the UNet mean head)
_BLOCKS = ["model.num_res_blocks=1", "model.channel_mult=[1,2,4,4]", "model.dec_num_res_blocks=1"]
STAGE1_CASES = {"diffae": [], "diffae_blocks": _BLOCKS, "diffae_unet_head": [*_BLOCKS, "model.mean_head=unet"]}
log = logging.getLogger("model_step")


def matmul_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Best-of ``n x n`` matmul FLOP/s (fp32 by default) with the current torch thread count."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _trainer_mmap_threshold(case: str) -> int | None:
    """The malloc setting a training worker of ``case``'s stage applies (``trainer.malloc_mmap_threshold_kb``)."""
    from cadiff.config import compose

    job, experiment = ("train_ae", "ae_default") if case in STAGE1_CASES else ("train_latent", "dit_s")
    return compose(job, [f"experiment={experiment}"]).trainer.malloc_mmap_threshold_kb


def _build(case: str, mode: str = "eager"):
    from cadiff.config import compose
    from cadiff.models.registry import build_model

    if case in STAGE1_CASES:
        store = ["model.recompute_elementwise=false"] if mode == "eager_store" else []
        # the pixel noise level only scales an analytic term: any value measures the same step cost
        overrides = ["experiment=ae_default", "model.noise_std=0.25", *STAGE1_CASES[case], *store]
        return build_model(compose("train_ae", overrides).model)
    cfg = compose("train_latent", ["experiment=dit_s", "model.in_channels=8"]).model
    return build_model(cfg)


def _net_forward(model, x):
    import torch

    if hasattr(model, "flop_forward"):
        return model.flop_forward(x)
    return model.dit(x, torch.zeros(x.shape[0], device=x.device))


def count_fwd_bwd_flops(case: str, shape: tuple[int, ...]) -> float:
    """Forward+backward FLOPs of the networks on one batch ``shape`` (meta tensors: no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = _build(case)
        x = torch.zeros(shape)
    with FlopCounterMode(display=False) as counter:
        _net_forward(model, x).square().mean().backward()
    return float(counter.get_total_flops())


def _train_step(model, x, gen, bf16: bool = False) -> None:
    """One forward+backward of ``model.training_loss``, gradients dropped; bf16 autocast as the trainer applies it
    (trainer.precision=bf16): fp32 weights, bf16 convs/matmuls."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = model.training_loss(x, gen)
    loss.backward()
    model.zero_grad(set_to_none=True)


def run_case(case: str, shape: tuple[int, ...], mode: str, threads: int, repeats: int) -> dict:
    """One case in this process: build, compile if asked, warm up, time ``repeats`` fwd+bwd steps."""
    import resource

    import torch

    from cadiff.runtime.memory import set_mmap_threshold
    from cadiff.train.loop import compile_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bf16 = mode.endswith("_bf16")
    mode = mode.removesuffix("_bf16")
    malloc_kb = None if mode == "eager_glibc_malloc" else _trainer_mmap_threshold(case)
    malloc_set = set_mmap_threshold(malloc_kb)
    model = _build(case, mode)
    # the trainer's trainer.compile placements: each network whole, or each shard unit (block)
    compile_model(model, {"compile_model": "model", "compile_blocks": "blocks"}.get(mode, "none"))
    x = torch.randn(shape)
    gen = torch.Generator().manual_seed(0)

    step = functools.partial(_train_step, model, x, gen, bf16)
    start = time.perf_counter()
    step()  # warm-up: oneDNN primitive creation, compilation
    warmup_s = time.perf_counter() - start
    times, matmuls = [], []
    for _ in range(repeats):
        matmuls.append(matmul_flops())
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    step_s = times[len(times) // 2]
    flops = count_fwd_bwd_flops(case, shape)
    mm = max(matmuls)
    mm_bf16 = max(matmul_flops(dtype="bfloat16") for _ in range(2)) if bf16 else None
    voxels = shape[0] * shape[2] * shape[3] * shape[4]
    return {
        "case": case, "shape": list(shape), "mode": mode + ("_bf16" if bf16 else ""), "threads": threads,
        "precision": "bf16" if bf16 else "fp32",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflop_fwd_bwd": flops / 1e9, "step_s": step_s, "step_min_s": times[0], "warmup_s": warmup_s,
        "gflops": flops / step_s / 1e9, "matmul_gflops": mm / 1e9, "ratio_to_matmul": flops / step_s / mm,
        "matmul_bf16_gflops": mm_bf16 / 1e9 if mm_bf16 else None,
        "ratio_to_bf16_matmul": flops / step_s / mm_bf16 if mm_bf16 else None,
        "voxels_per_s": voxels / step_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # Linux: KiB
        "malloc_mmap_threshold_kb": malloc_kb if malloc_set else None,
    }


def profile_step(frames: int, threads: int) -> dict:
    """One eager fp32 step of the default DiffAE on ``1x1xframes x64x64`` under ``torch.profiler`` (after a warm-up
    step), its self CPU time by category and the costliest convolutions by shape."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cadiff.bench import step_profile
    from cadiff.runtime.memory import set_mmap_threshold

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    set_mmap_threshold(_trainer_mmap_threshold("diffae"))
    model = _build("diffae")
    x = torch.randn(1, 1, frames, 64, 64)
    gen = torch.Generator().manual_seed(0)

    step = functools.partial(_train_step, model, x, gen)
    step()  # warm-up: oneDNN primitive creation
    start = time.perf_counter()
    step()
    plain_s = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    ops = step_profile.from_profiler(prof.key_averages())
    by_shape = step_profile.from_profiler(prof.key_averages(group_by_input_shape=True))
    return {"frames": frames, "threads": threads, "step_s": plain_s, "matmul_gflops": matmul_flops() / 1e9,
            "categories": step_profile.breakdown(ops), "convs": step_profile.conv_shapes(by_shape)}


def write_profile(result: dict, meta: dict, out: Path) -> None:
    """``model_step_profile.json`` and ``.md``: the breakdown tables of :func:`profile_step`."""
    write_json_atomic(out / "model_step_profile.json", {"meta": meta, **result})
    conv = sum(r["share"] for r in result["categories"] if r["category"].startswith("conv"))
    lines = [
        "# Where a stage-1 training step spends its time", "",
        f"Default DiffAE (`experiment=ae_default`), one eager fp32 step on 1x1x{result['frames']}x64x64, "
        f"{result['threads']} threads, host `{meta['host']}` with {meta['cpus']} CPUs, torch {meta['torch']}: "
        f"{result['step_s']:.2f} s without the profiler (fp32 matmul {result['matmul_gflops']:.0f} GFLOP/s in the "
        f"same process). Self CPU time of each op under `torch.profiler` (which adds its own overhead), grouped "
        f"by `cadiff.bench.step_profile.CATEGORIES`. Produced by `python benchmarks/model_step.py --profile "
        f"{result['frames']}`.", "",
        f"**Convolutions take {conv:.0%} of the step.**", "",
        "| category | ms | share | profiler records |", "|---|---:|---:|---:|",
        *[f"| {r['category']} | {r['ms']:.0f} | {r['share']:.1%} | {r['records']} |" for r in result["categories"]],
        "", "Costliest convolutions by input shapes (backward: output gradient / input / weight):", "",
        "| op | input shapes | profiler records | ms |", "|---|---|---:|---:|",
        *[f"| {r['op']} | {r['shapes']} | {r['records']} | {r['ms']:.0f} |" for r in result["convs"]],
        "",
        "Records are the profiler's: a forward convolution inside a selective-recompute checkpoint "
        "(`model.recompute_elementwise`) is recorded again by the checkpoint's dispatch mode and where backward "
        "fetches its kept output, so the counts exceed the layers; self times are not counted twice.",
        "",
    ]
    write_text_atomic(out / "model_step_profile.md", "\n".join(lines))


def _spawn(case: str, shape: tuple[int, ...], mode: str, threads: int, repeats: int, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--child", case, ",".join(map(str, shape)), mode, str(threads), str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "shape": list(shape), "mode": mode, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"case": case, "shape": list(shape), "mode": mode, "error": tail[0][:300]}
    return json.loads(lines[-1])


def _speedup(row: dict, anchors: dict) -> float | None:
    anchor = anchors.get(row["shape"][2]) if row["case"] in STAGE1_CASES and "error" not in row else None
    if anchor is None:
        return None
    return normalised_speedup(row["voxels_per_s"], row["matmul_gflops"] * 1e9, anchor)


def _diffae_rows(rows: list[dict], frames: int) -> list[dict]:
    return [r for r in rows if "error" not in r and r["case"] == "diffae" and r["shape"][2] == frames]


def summary(rows: list[dict], anchors: dict) -> dict:
    """The headline figures: normalised speedups (eager fp32 and the fastest mode) per length, fp32 RSS at 65."""
    out: dict = {}
    for frames in (17, 65):
        cand = [(s, r) for r in _diffae_rows(rows, frames) if (s := _speedup(r, anchors)) is not None]
        fp32 = [s for s, r in cand if r["mode"] == "eager"]
        out[f"speedup_fp32_T{frames}"] = round(fp32[0], 3) if fp32 else None
        out[f"speedup_best_T{frames}"] = round(max(s for s, _ in cand), 3) if cand else None
    eager65 = [r for r in _diffae_rows(rows, 65) if r["mode"] == "eager"]
    out["peak_rss_gb_fp32_T65"] = round(eager65[0]["peak_rss_gb"], 3) if eager65 else None
    return out


def _best_mode(rows: list[dict], frames: int, anchors: dict) -> str:
    cand = [r for r in _diffae_rows(rows, frames) if _speedup(r, anchors) is not None]
    return max(cand, key=lambda r: _speedup(r, anchors))["mode"] if cand else "-"


def unmeasured_modes(rows: list[dict], frames: int) -> list[str]:
    """DiffAE modes of the full plan at ``frames`` frames with no measured row: a "fastest mode" is only the
    fastest of those measured."""
    full = _plan(argparse.Namespace(case=None, quick=False, no_compile=False))
    measured = {r["mode"] for r in _diffae_rows(rows, frames)}
    return [m for case, shape, m in full if case == "diffae" and shape[2] == frames and m not in measured]


def _goal(name: str, value: float | None, target: float, fmt: str, at_most: bool = False, note: str = "") -> str:
    if value is None:
        return f"- {name}: not measured in this run"
    met = value <= target if at_most else value >= target
    return f"- {name}: {fmt.format(value)} ({'met' if met else 'not met'}{note})"


def goal_lines(rows: list[dict], anchors: dict) -> list[str]:
    """Issue 18's benchmark goals, each met / not met with the measured number."""
    s = summary(rows, anchors)
    lines = ["## Goals (issue 18)", ""]
    for frames in (17, 65):
        lines.append(_goal(f"normalised speedup >= 2.0x, eager fp32, {frames} frames", s[f"speedup_fp32_T{frames}"],
                           2.0, "{:.2f}x"))
        missing = unmeasured_modes(rows, frames)
        lines.append(_goal(f"normalised speedup >= 3.0x, fastest mode ({_best_mode(rows, frames, anchors)}), "
                           f"{frames} frames", s[f"speedup_best_T{frames}"], 3.0, "{:.2f}x",
                           note=f"; not measured: {', '.join(missing)}" if missing else ""))
    lines.append(_goal("peak RSS at 1x1x65x64x64 eager fp32 <= 2.0 GB", s["peak_rss_gb_fp32_T65"], 2.0, "{:.2f} GB",
                       at_most=True))
    return lines


def write_markdown(rows: list[dict], meta: dict, anchors: dict, path: Path) -> None:
    """The results table as markdown."""
    lines = [
        "# Model step benchmark",
        "",
        f"{meta['threads']} threads, host `{meta['host']}` with {meta['cpus']} CPUs, torch {meta['torch']}; "
        f"load average at start {meta['load_start']}, at end {meta['load_end']} (other jobs share the machine).",
        "",
        "**Normalisation.** \"speedup vs. seed\" = (our voxels/s / our fp32 matmul FLOP/s) / (seed voxels/s / seed "
        "fp32 matmul FLOP/s): each side's clip voxels per second divided by its own 2048^2 fp32 `torch.mm` rate "
        "measured in the same process (ours right before each timed step, best of the case's runs), so the two "
        "machines' speeds cancel. bf16 rows are normalised by the same fp32 matmul. Seed runs (`../shared/anchors/`): "
        + "; ".join(f"{f} frames: `{a.file}`, {a.step_s:.2f} s/step, {a.voxels_per_s:.0f} voxels/s, matmul "
                    f"{a.matmul_flops / 1e9:.1f} GFLOP/s" for f, a in sorted(anchors.items())) + ".",
        "",
        "| model | input | mode | params (M) | GFLOP fwd+bwd | step (s) | GFLOP/s | fp32 matmul GFLOP/s | "
        "ratio to matmul | ratio to bf16 matmul | voxels/s | speedup vs. seed (normalised) | peak RSS (GB) | "
        "seed RSS (GB) | warm-up (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"| {r['case']} | {shape} | {r['mode']} | error: {r['error']} ||||||||||||")
            continue
        speed = _speedup(r, anchors)
        anchor = anchors.get(r["shape"][2]) if r["case"] in STAGE1_CASES else None
        seed_rss = f"{anchor.peak_rss_gb:.1f}" if anchor and anchor.peak_rss_gb else ""
        bf16_ratio = f"{r['ratio_to_bf16_matmul']:.2f}" if r.get("ratio_to_bf16_matmul") else ""
        lines.append(
            f"| {r['case']} | {shape} | {r['mode']} | {r['params_m']:.1f} | {r['gflop_fwd_bwd']:.0f} | {r['step_s']:.2f} | "
            f"{r['gflops']:.0f} | {r['matmul_gflops']:.0f} | {r['ratio_to_matmul']:.2f} | {bf16_ratio} | "
            f"{r['voxels_per_s']:.0f} | {f'{speed:.2f}x' if speed else ''} | {r['peak_rss_gb']:.2f} | {seed_rss} | "
            f"{r['warmup_s']:.1f} |")
    lines += [
        "",
        "\"ratio to matmul\" is achieved FLOP/s over the same-process fp32 matmul (it can exceed 1 on this CPU: a "
        "2-thread 2048^2 mm is no ceiling here, hence the speedup normalises voxels/s, not FLOP/s); the bf16 rows add "
        "the ratio to a bf16 matmul (AMX where the CPU has it). The load average above is that of the whole machine: "
        "work of other processes during a timed step slows it without lowering the matmul measured before it, so a "
        "loaded run understates the speedup.",
        "",
        "Every row except `eager_glibc_malloc` runs with glibc's mmap threshold fixed at "
        "`trainer.malloc_mmap_threshold_kb` (what training workers set, `cadiff/runtime/memory.py`): tensors above "
        "it are unmapped when freed instead of fragmenting the heap; `eager_glibc_malloc` keeps glibc's default "
        "(a threshold that rises with every large free) for comparison.",
        "",
        "`diffae` rows are the default model: an encoder of constant width without residual blocks per level (its "
        "strided convs and one mid block) and a mean head that only upsamples from the latent "
        "(`cadiff.models.unet3d.LatentUpsampler`, one block per level). `diffae_blocks` rows are the default before it "
        "(one block per level in a widening encoder, `channel_mult=[1,2,4,4]`, and two per level in the upsampler), "
        "`diffae_unet_head` rows the default before that (the same blocks, `model.mean_head=unet`); each was replaced "
        "by a model of equal or better quality for about equal training time (`docs/design.md`, \"Stage-1 size\", "
        "with the goal counts). The goals below use `diffae` rows only.",
        "",
        *goal_lines(rows, anchors),
        "",
    ]
    write_text_atomic(path, "\n".join(lines))


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of an earlier run, each replaced by this run's row of the same case, shape and mode."""
    key = lambda r: (r["case"], tuple(r["shape"]), r["mode"])  # noqa: E731
    fresh = {key(r): r for r in new}
    kept = [fresh.pop(key(r), r) for r in old]
    return kept + list(fresh.values())


def _parse_case(text: str) -> tuple[str, tuple[int, ...], str]:
    """``diffae:65:eager`` / ``dit:17:eager_bf16`` -> a plan entry."""
    try:
        case, frames, mode = text.split(":")
        shape = (1, 1, int(frames), 64, 64) if case in STAGE1_CASES else (8, 8, int(frames), 8, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--case {text!r}: expected CASE:FRAMES:MODE, e.g. diffae:65:eager") from None
    if case not in (*STAGE1_CASES, "dit") or mode.removesuffix("_bf16") not in MODES:
        raise argparse.ArgumentTypeError(f"--case {text!r}: case {'|'.join(STAGE1_CASES)}|dit, mode one of "
                                         f"{', '.join(MODES)} (+ _bf16)")
    return case, shape, mode


def _plan(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...], str]]:
    if args.case:
        return args.case
    dit_shape = (8, 8, 17, 8, 8)  # 8 latents of a 65x64x64 clip (z=8, 8x spatial, 4x temporal)
    if args.quick:
        return [("diffae", (1, 1, 17, 64, 64), m) for m in ("eager", "eager_bf16")] + [("dit", dit_shape, "eager")]
    plan = [("diffae", (1, 1, 17, 64, 64), m)
            for m in ("eager", "eager_bf16", "compile_model", "compile_blocks", "compile_model_bf16",
                      "compile_blocks_bf16")]
    plan += [("diffae", (1, 1, 65, 64, 64), m) for m in ("eager", "eager_store", "eager_glibc_malloc", "eager_bf16",
                                                              "compile_blocks", "compile_model_bf16",
                                                              "compile_blocks_bf16")]
    plan += [(case, (1, 1, f, 64, 64), m) for case in ("diffae_blocks", "diffae_unet_head") for f in (17, 65)
             for m in ("eager", "eager_bf16")]
    plan += [("dit", dit_shape, m) for m in ("eager", "eager_bf16", "compile_model", "compile_blocks")]
    if args.no_compile:
        plan = [p for p in plan if not p[2].startswith("compile")]
    return plan


def _write(rows: list[dict], meta: dict, anchors: dict, out: Path) -> None:
    meta["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    anchor_meta = {str(f): {"file": a.file, "step_s": a.step_s, "voxels_per_s": a.voxels_per_s,
                            "matmul_gflops": a.matmul_flops / 1e9} for f, a in anchors.items()}
    rows = [{**r, "speedup_vs_seed": _speedup(r, anchors)} for r in rows]
    write_json_atomic(out / "model_step.json", {"summary": summary(rows, anchors), "meta": meta,
                                                "anchors": anchor_meta, "rows": rows})
    write_markdown(rows, meta, anchors, out / "model_step.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="eager 17-frame DiffAE and the DiT only (< 2 min)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--case", action="append", type=_parse_case,
                        help="run only CASE:FRAMES:MODE (repeatable; e.g. diffae:65:eager); rows of the earlier "
                             "results with another case/shape/mode are kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 2 quick, 3 full)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--anchors", type=Path, default=DEFAULT_ANCHORS, help="the seed's measurements (*.json)")
    parser.add_argument("--profile", type=int, metavar="FRAMES", default=None,
                        help="profile one eager fp32 DiffAE step on FRAMES frames (1 + 4k) instead of timing cases")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile is not None:
        if args.profile < 1 or (args.profile - 1) % 4:
            sys.exit(f"model_step: error: --profile {args.profile}: expected a clip length 1 + 4k (e.g. 17, 65)")
        import torch

        meta = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg())}
        write_profile(profile_step(args.profile, args.threads), meta, args.out)
        log.info("wrote %s and %s", args.out / "model_step_profile.json", args.out / "model_step_profile.md")
        return
    if args.child:
        case, shape, mode, threads, repeats = args.child
        row = run_case(case, tuple(int(v) for v in shape.split(",")), mode, int(threads), int(repeats))
        print(json.dumps(row))
        return
    try:
        anchors = load_anchors(args.anchors)
    except CadiffError as exc:
        sys.exit(f"model_step: error: {exc}")

    import torch

    repeats = args.repeats or (2 if args.quick else 3)
    meta = {"threads": args.threads, "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()), "quick": args.quick, "repeats": repeats}
    earlier = []
    if args.case and (args.out / "model_step.json").exists():
        earlier = json.loads((args.out / "model_step.json").read_text())["rows"]
    rows: list[dict] = []
    for case, shape, mode in _plan(args):
        row = _spawn(case, shape, mode, args.threads, repeats, timeout_s=900)
        rows.append(row)
        speed = _speedup(row, anchors)
        summary_line = row.get("error") or (f"{row['step_s']:.2f} s, {row['peak_rss_gb']:.2f} GB"
                                            + (f", {speed:.2f}x the seed (normalised)" if speed else ""))
        log.info("%s %s %s: %s", case, "x".join(map(str, shape)), mode, summary_line)
        _write(_merge(earlier, rows), meta, anchors, args.out)  # after every case: an interrupted run keeps its rows
    log.info("wrote %s and %s", args.out / "model_step.json", args.out / "model_step.md")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
