"""Model step benchmark: forward+backward time, FLOPs, FLOP/s vs. this machine's fp32 matmul, peak memory.

Cases: the default stage-1 DiffAE (``experiment=ae_default``) on one ``1x17x64x64`` and one ``1x65x64x64`` clip,
and a small DiT (size S) on a batch of latents, each eager, ``torch.compile`` of the whole networks, and
``torch.compile`` per block (each of ``shard_units()``) - the seed's open question of where compile pays;
``eager_store`` keeps the norm/FiLM/SiLU activations instead of recomputing them in backward. Every case runs
in its own process (clean peak RSS) with ``--threads`` torch threads; the matmul FLOP/s is measured in that
process right before the timed steps, so the ratio is robust to other load on the machine. FLOPs are counted by
``torch.utils.flop_counter`` (convs, matmuls, attention; forward and backward on meta tensors).

    python benchmarks/model_step.py --quick     # eager 17-frame DiffAE + DiT, < 2 min on 2 cores
    python benchmarks/model_step.py             # all cases (~30 min on 2 shared cores: compilation dominates)

Results: ``benchmarks/results/model_step.json`` and ``model_step.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"

# Issue 3's reference: the seed's 27.8M-parameter causal conv DiffAE, fp32, 2 threads, on the issue's machine
REFERENCE = {
    17: {"gflop_fwd_bwd": 467.0, "step_s": 3.5, "ratio_to_matmul": 0.73, "peak_rss_gb": 2.1},
    65: {"gflop_fwd_bwd": 1720.0, "step_s": 15.3, "ratio_to_matmul": 0.62, "peak_rss_gb": 5.4},
}


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


def _build(case: str, mode: str = "eager"):
    from cadiff.config import compose
    from cadiff.models.registry import build_model

    if case == "diffae":
        store = ["model.recompute_elementwise=false"] if mode == "eager_store" else []
        # the pixel noise level only scales an analytic term: any value measures the same step cost
        return build_model(compose("train_ae", ["experiment=ae_default", "model.noise_std=0.25", *store]).model)
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


def run_case(case: str, shape: tuple[int, ...], mode: str, threads: int, repeats: int) -> dict:
    """One case in this process: build, compile if asked, warm up, time ``repeats`` fwd+bwd steps."""
    import resource

    import torch

    from cadiff.train.loop import compile_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bf16 = mode.endswith("_bf16")
    mode = mode.removesuffix("_bf16")
    model = _build(case, mode)
    # the trainer's trainer.compile placements: each network whole, or each shard unit (block)
    compile_model(model, {"compile_model": "model", "compile_blocks": "blocks"}.get(mode, "none"))
    x = torch.randn(shape)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        # bf16 autocast as the trainer applies it (trainer.precision=bf16): fp32 weights, bf16 convs/matmuls
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.training_loss(x, gen)
        loss.backward()
        model.zero_grad(set_to_none=True)

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
    }


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


def _reference_cols(row: dict) -> tuple[str, str]:
    ref = REFERENCE.get(row["shape"][2]) if row["case"] == "diffae" else None
    if not ref or "error" in row:
        return "", ""
    ref_vox = row["shape"][2] * row["shape"][3] * row["shape"][4] / ref["step_s"]
    return f"{row['voxels_per_s'] / ref_vox:.2f}x", f"{ref['peak_rss_gb']:.1f}"


def goal_lines(rows: list[dict]) -> list[str]:
    """Issue 3's goals per clip length, for the best fp32 and the best bf16 DiffAE row."""
    out = ["## Goals (issue 3): FLOP/s >= 0.7 of fp32 matmul, voxels/s >= 1.5x reference, peak RSS at 65 frames "
           "<= 2.7 GB", ""]
    for frames in (17, 65):
        for precision in ("fp32", "bf16"):
            cand = [r for r in rows if "error" not in r and r["case"] == "diffae" and r["shape"][2] == frames
                    and r.get("precision", "fp32") == precision]
            if not cand:
                continue
            best = min(cand, key=lambda r: r["step_s"])
            ref_vox = frames * 64 * 64 / REFERENCE[frames]["step_s"]
            speed = best["voxels_per_s"] / ref_vox
            checks = [f"ratio {best['ratio_to_matmul']:.2f} ({'met' if best['ratio_to_matmul'] >= 0.7 else 'not met'})",
                      f"voxels/s {speed:.2f}x ({'met' if speed >= 1.5 else 'not met'})"]
            if frames == 65:
                checks.append(f"peak RSS {best['peak_rss_gb']:.2f} GB "
                              f"({'met' if best['peak_rss_gb'] <= 2.7 else 'not met'})")
            out.append(f"- {frames} frames, {precision} (fastest: {best['mode']}): " + ", ".join(checks))
    return out


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    """The results table as markdown."""
    lines = [
        "# Model step benchmark",
        "",
        f"fp32, {meta['threads']} threads, host `{meta['host']}` with {meta['cpus']} CPUs, torch {meta['torch']}; "
        f"load average at start {meta['load_start']}, at end {meta['load_end']} (other jobs share the machine; "
        "the FLOP/s ratio uses a matmul measured in the same process right before each step).",
        "",
        "| model | input | mode | params (M) | GFLOP fwd+bwd | step (s) | GFLOP/s | matmul GFLOP/s | ratio | "
        "ratio to bf16 matmul | voxels/s | vs. reference | peak RSS (GB) | ref. RSS (GB) | warm-up (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"| {r['case']} | {shape} | {r['mode']} | error: {r['error']} ||||||||||||")
            continue
        speed, ref_rss = _reference_cols(r)
        bf16_ratio = f"{r['ratio_to_bf16_matmul']:.2f}" if r.get("ratio_to_bf16_matmul") else ""
        lines.append(
            f"| {r['case']} | {shape} | {r['mode']} | {r['params_m']:.1f} | {r['gflop_fwd_bwd']:.0f} | {r['step_s']:.2f} | "
            f"{r['gflops']:.0f} | {r['matmul_gflops']:.0f} | {r['ratio_to_matmul']:.2f} | {bf16_ratio} | {r['voxels_per_s']:.0f} | "
            f"{speed} | {r['peak_rss_gb']:.2f} | {ref_rss} | {r['warmup_s']:.1f} |")
    lines += [
        "",
        "Reference (issue 3, the seed's 27.8M-parameter DiffAE on its machine): 1x17x64x64 467 GFLOP, 3.5 s, "
        "0.73 of matmul, 2.1 GB; 1x65x64x64 1.72 TFLOP, 15.3 s, 0.62 of matmul, 5.4 GB. \"vs. reference\" is the "
        "ratio of clip voxels per second. \"ratio\" is achieved FLOP/s over the fp32 matmul FLOP/s measured in the "
        "same process (the issue's definition, also for the bf16 rows); the bf16 rows add the ratio to a bf16 "
        "matmul (AMX where the CPU has it), the fair ceiling for bf16 compute.",
        "",
        *goal_lines(rows),
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="eager 17-frame DiffAE and the DiT only (< 2 min)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 2 quick, 3 full)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, shape, mode, threads, repeats = args.child
        row = run_case(case, tuple(int(v) for v in shape.split(",")), mode, int(threads), int(repeats))
        print(json.dumps(row))
        return

    import torch

    repeats = args.repeats or (2 if args.quick else 3)
    dit_shape = (8, 8, 17, 8, 8)  # 8 latents of a 65x64x64 clip (z=8, 8x spatial, 4x temporal)
    if args.quick:
        plan = [("diffae", (1, 1, 17, 64, 64), m) for m in ("eager", "eager_bf16")] + [("dit", dit_shape, "eager")]
    else:
        plan = [("diffae", (1, 1, 17, 64, 64), m)
                for m in ("eager", "eager_bf16", "compile_model", "compile_blocks", "compile_blocks_bf16")]
        plan += [("diffae", (1, 1, 65, 64, 64), m) for m in ("eager", "eager_store", "eager_bf16", "compile_blocks",
                                                                  "compile_blocks_bf16")]
        plan += [("dit", dit_shape, m) for m in ("eager", "eager_bf16", "compile_model", "compile_blocks")]
        if args.no_compile:
            plan = [p for p in plan if not p[2].startswith("compile")]
    meta = {"threads": args.threads, "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()), "quick": args.quick, "repeats": repeats}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for case, shape, mode in plan:
        row = _spawn(case, shape, mode, args.threads, repeats, timeout_s=900)
        rows.append(row)
        summary = row.get("error") or f"{row['step_s']:.2f} s, {row['ratio_to_matmul']:.2f} of matmul, " \
                                      f"{row['peak_rss_gb']:.2f} GB"
        print(f"{case} {'x'.join(map(str, shape))} {mode}: {summary}", flush=True)
        # rewrite after every case so an interrupted run keeps what it measured
        meta["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
        (args.out / "model_step.json").write_text(json.dumps({"meta": meta, "reference": REFERENCE, "rows": rows},
                                                             indent=2))
        write_markdown(rows, meta, args.out / "model_step.md")
    print(f"wrote {args.out / 'model_step.json'} and {args.out / 'model_step.md'}")


if __name__ == "__main__":
    main()
