"""Stage-1 training throughput per strategy: samples/s, MFU and data-wait fraction from short real runs.

Each case is a short ``jobs/train_ae.py`` run (``run_training``, the job's own code path) on simulated clips:
``single`` (in-process, no Ray, the per-rank torch batch iterator), ``ddp`` with 1 and 2 workers, and
DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 with 2 workers (Ray Train + Ray Data streaming ingest). Every worker uses
the same torch thread count (``--threads``, default 1). DDP scaling is "DDP 2 workers / DDP 1 worker": both run
the same Ray Train + Ray Data path, so only the worker count differs; ``single`` (in-process, another batch
iterator, no Ray) is reported in its own row and line, never as the scaling baseline. The numbers come from the runs' ``metrics.jsonl`` windows of ``--log-every`` steps: the first window
(process start, allocator and Ray Data warm-up) is dropped and the rest averaged. MFU divides the achieved
FLOP/s (3x the counted forward FLOPs per sample, Kaplan et al. 2020, arXiv:2001.08361) by each worker's
measured fp32 matmul FLOP/s at its thread count (cadiff/train/logging.py).

Goals (issue 4): data wait < 2% of step time; DDP with 2 workers >= 1.6x DDP with 1 worker in samples/s where the
cores allow it - on a 2-core host shared with other processes, 2 workers x 1 thread cannot reach that when
the cores are busy, and the table says so rather than hiding it.

    python benchmarks/train_throughput.py                      # tiny config (ae_tiny), ~4-5 min on 2 cores
    python benchmarks/train_throughput.py --config default     # ae_default on 17x64x64 clips (slow on CPU)
    python benchmarks/train_throughput.py --cases ddp1 ddp2    # a subset
    python benchmarks/train_throughput.py --render             # re-summarise the saved JSON (no runs)

Results: ``benchmarks/results/train_throughput.json`` and ``train_throughput.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.io import write_json_atomic, write_text_atomic  # noqa: E402

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (strategy, workers)
CASES = {
    "single": ("single", 1),
    "ddp1": ("ddp", 1),
    "ddp2": ("ddp", 2),
    "zero2": ("deepspeed_zero2", 2),
    "zero3": ("deepspeed_zero3", 2),
    "fsdp2": ("fsdp2", 2),
}
CONFIGS = {
    # experiment, prepared clip size (frames, height, width), per-worker batch
    "tiny": ("ae_tiny", (17, 32, 32), 2),
    "default": ("ae_default", (17, 64, 64), 1),
}
DATA_WAIT_GOAL = 0.02
DDP_SPEEDUP_GOAL = 1.6


def prepare(root: Path, clip: tuple[int, int, int], movies: int) -> None:
    """Simulated movies tiled into clips of ``clip`` (frames, height, width)."""
    from cadiff.config import compose
    from cadiff.data.prepare import prepare_data

    frames, height, width = clip
    overrides = ["source=sim", f"source.num_movies={movies}", f"source.frames={frames * 6}",
                 f"source.height={height}", f"source.width={width}", f"clip.frames={frames}",
                 f"clip.height={height}", f"clip.width={width}", "clips_per_shard=6", f"out={root}"]
    prepare_data(compose("prepare_data", overrides))


def steady_windows(metrics_path: Path) -> list[dict]:
    """The logged training windows of a run after the first (warm-up) one."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    windows = [r for r in rows if "samples_per_s" in r]
    if len(windows) < 2:
        raise RuntimeError(f"{metrics_path}: {len(windows)} logged windows; need >= 2 (raise --steps)")
    return windows[1:]


def run_case(name: str, args: argparse.Namespace, data_root: Path, out_root: Path) -> dict:
    """Train one strategy for ``args.steps`` steps and summarize its steady-state windows."""
    from cadiff.config import compose
    from cadiff.train.launch import run_training

    strategy, workers = CASES[name]
    experiment, _clip, batch = CONFIGS[args.config]
    cfg = compose("train_ae", [
        f"experiment={experiment}", f"strategy={strategy}", f"data.root={data_root}", f"out_root={out_root}",
        f"run_name={name}", f"data.batch_size={batch}", f"trainer.max_steps={args.steps}",
        f"trainer.num_workers={workers}", f"trainer.cpus_per_worker={args.cpus_per_worker}",
        f"trainer.threads_per_worker={args.threads}", f"trainer.log_every={args.log_every}",
        f"trainer.val_every={args.steps}", f"trainer.ckpt_every={args.steps}", "trainer.media_every=0",
        f"trainer.warmup_steps={min(5, args.steps)}", f"ray.num_cpus={args.ray_cpus}",
    ])  # fmt: skip
    start = time.perf_counter()
    _summary, run_dir = run_training(cfg, "ae")
    wall = time.perf_counter() - start
    windows = steady_windows(Path(run_dir) / "metrics.jsonl")
    mfu = mean(w["mfu"] for w in windows)
    flops = mean(w["flops_per_s"] for w in windows)
    return {
        "case": name,
        "strategy": strategy,
        "workers": workers,
        "threads_per_worker": args.threads,
        "batch_per_worker": batch,
        "samples_per_s": mean(w["samples_per_s"] for w in windows),
        "mfu": mfu,
        "flops_per_s": flops,
        # the matmul FLOP/s each worker measured at its thread count: how much of the host it had
        "peak_flops_per_worker": flops / workers / mfu,
        "data_wait_frac": mean(w["data_wait_frac"] for w in windows),
        "steady_windows": len(windows),
        "steps": args.steps,
        "wall_s": wall,
    }


def _ratio(two: dict, one: dict) -> tuple[float, float]:
    """Samples/s ratio and the same per unit of the matmul rate each run measured (removes differing load)."""
    return (two["samples_per_s"] / one["samples_per_s"],
            (two["workers"] * two["mfu"]) / (one["workers"] * one["mfu"]))


def summarize(rows: list[dict]) -> dict:
    """DDP scaling (2 workers over 1, same Ray path), the single-process run on its own, and goal checks."""
    by_case = {r["case"]: r for r in rows}
    out: dict = {}
    if "ddp1" in by_case and "ddp2" in by_case:
        out["ddp_scaling"], out["ddp_scaling_per_peak"] = _ratio(by_case["ddp2"], by_case["ddp1"])
        out["ddp_speedup_goal_met"] = out["ddp_scaling"] >= DDP_SPEEDUP_GOAL
    if "single" in by_case and "ddp1" in by_case:
        out["ddp1_vs_single"], _ = _ratio(by_case["ddp1"], by_case["single"])
    out["data_wait_goal_met"] = {r["case"]: r["data_wait_frac"] < DATA_WAIT_GOAL for r in rows}
    return out


def to_markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        "# Stage-1 training throughput", "",
        f"Config `{result['experiment']}` on {result['clip']} clips, {result['steps']} steps per run, windows of "
        f"{result['log_every']} steps (first dropped), {result['threads']} torch thread(s) per worker, host "
        f"`{result['host']}` with {result['cpus']} CPUs (load average {result['load_avg_1m']:.1f} at start), "
        f"torch {result['torch']}, ray {result['ray']}.", "",
        "| case | strategy | workers | samples/s | MFU | achieved GFLOP/s | measured peak GFLOP/s per worker "
        "| data wait | run wall (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in (r for r in result["rows"] if r["case"] != "single"):
        lines.append(
            f"| {r['case']} | {r['strategy']} | {r['workers']} | {r['samples_per_s']:.2f} | {r['mfu']:.3f} | "
            f"{r['flops_per_s'] / 1e9:.2f} | {r['peak_flops_per_worker'] / 1e9:.1f} | "
            f"{100 * r['data_wait_frac']:.2f}% | {r['wall_s']:.0f} |"
        )
    single = [r for r in result["rows"] if r["case"] == "single"]
    if single:
        r = single[0]
        lines += ["", "Single process (`strategy=single`: in-process, no Ray, the deterministic batch iterator; not a "
                  "scaling baseline):", "", "| case | samples/s | MFU | achieved GFLOP/s | measured peak GFLOP/s | "
                  "data wait | run wall (s) |", "|---|---:|---:|---:|---:|---:|---:|",
                  f"| single | {r['samples_per_s']:.2f} | {r['mfu']:.3f} | {r['flops_per_s'] / 1e9:.2f} | "
                  f"{r['peak_flops_per_worker'] / 1e9:.1f} | {100 * r['data_wait_frac']:.2f}% | {r['wall_s']:.0f} |"]
    lines.append("")
    if "ddp_scaling" in s:
        verdict = "met" if s["ddp_speedup_goal_met"] else "not met"
        lines.append(f"- DDP scaling, 2 workers vs DDP 1 worker (same Ray Train + Ray Data path): "
                     f"**{s['ddp_scaling']:.2f}x** samples/s (goal >= {DDP_SPEEDUP_GOAL}x: {verdict}); per unit of "
                     f"measured matmul rate {s['ddp_scaling_per_peak']:.2f}x.")
    if "ddp1_vs_single" in s:
        lines.append(f"- DDP 1 worker vs single process: {s['ddp1_vs_single']:.2f}x samples/s (the two differ in "
                     "batch iterator and process set-up, not in worker count).")
    missed = [c for c, ok in s["data_wait_goal_met"].items() if not ok]
    lines.append(f"- Data wait < {100 * DATA_WAIT_GOAL:.0f}% of step time: "
                 + ("met by every case." if not missed else f"missed by {', '.join(missed)}."))
    lines.append(f"- {result['note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log-every", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (equal for every case)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="Ray CPUs reserved per worker")
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    # 36 movies: ~180 training clips, so one Ray Data epoch outlasts the measured steps (see the notes below)
    parser.add_argument("--movies", type=int, default=36)
    parser.add_argument("--data", type=Path, default=None, help="existing clip shards (default: simulate)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="re-summarise the saved results JSON, run nothing")
    args = parser.parse_args()
    if args.render:
        render(args.out / f"{_stem(args.config)}.json")
        return
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two --log-every windows (the first is warm-up)")

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray
    import torch

    experiment, clip, _batch = CONFIGS[args.config]
    load_avg = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cadiff-train-bench-") as tmp:
        data_root = args.data or Path(tmp) / "data"
        if args.data is None:
            prepare(data_root, clip, args.movies)
        for name in args.cases:
            row = run_case(name, args, data_root, Path(tmp) / "runs")
            print(f"{name}: {row['samples_per_s']:.2f} samples/s, MFU {row['mfu']:.3f}, "
                  f"data wait {100 * row['data_wait_frac']:.2f}%, {row['wall_s']:.0f} s", flush=True)
            rows.append(row)
    if ray.is_initialized():
        ray.shutdown()

    result = {
        "experiment": experiment, "config": args.config, "clip": list(clip), "steps": args.steps,
        "log_every": args.log_every, "threads": args.threads, "cpus_per_worker": args.cpus_per_worker,
        "host": platform.node(), "cpus": os.cpu_count(), "load_avg_1m": load_avg,
        "torch": torch.__version__, "ray": ray.__version__, "rows": rows, "summary": summarize(rows),
        "note": "single runs in-process on the deterministic per-rank batch iterator; the other cases run "
                "under Ray Train with Ray Data streaming ingest. On a 2-core host shared with other processes "
                "(see the load average) two 1-thread workers do not get a core each, so 2-worker speedups "
                "depend on that load. Each new Ray Data epoch restarts the streaming split (~0.2-0.4 s here): "
                "with 6 movies (~7 steps per epoch) that alone made the data wait 3-10% of step time; with "
                f"{args.movies} movies one epoch outlasts the measured steps, as on real datasets.",
    }  # fmt: skip
    _write(result, args.out / f"{_stem(args.config)}.json")


def _stem(config: str) -> str:
    return "train_throughput" if config == "tiny" else f"train_throughput_{config}"


def _write(result: dict, path: Path) -> None:
    write_json_atomic(path, result)
    write_text_atomic(path.with_suffix(".md"), to_markdown(result))
    print(f"-> {path}, .md")


def render(path: Path) -> None:
    """Recompute the summary and markdown of a saved run (the measured rows are kept as they are)."""
    if not path.is_file():
        sys.exit(f"train_throughput: error: {path}: no saved results to render (run the benchmark first)")
    result = json.loads(path.read_text())
    result["summary"] = summarize(result["rows"])
    _write(result, path)


if __name__ == "__main__":
    main()
