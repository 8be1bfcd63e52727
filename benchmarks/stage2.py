"""Stage-2 benchmark: latent encode throughput, DiT training tokens/s and MFU, sampling time per clip vs. NFE.

Three measurements in one process, with the library's models used directly (no Ray, no jobs):

- **encode**: clips/s of the ``ae_tiny`` encoder (``model.encode``, posterior mean, no grad) on batches of
  ``1x17x32x32`` clips - the per-actor work of ``jobs/encode_latents.py`` without the Ray Data plumbing.
- **train**: forward+backward steps of ``LatentDiffusion.training_loss`` for the DiT at sizes tiny and S on
  latent batches. Tokens per sample are ``(T/p_t)(H/p_h)(W/p_w)``; MFU is ``3 x forward FLOPs per sample x
  samples/s`` (Kaplan et al. 2020, arXiv:2001.08361) over this process's fp32 matmul FLOP/s measured with
  ``cadiff.train.logging.measure_matmul_flops`` at the same thread count right before each timed step, so the
  ratio holds up under other load on the shared machine.
- **sample**: seconds per clip of ``LatentDiffusion.sample`` for euler at several NFE and heun, and of the
  ``ae_tiny`` DiffAE decode of those latents (its own flow sampler), reported separately because the decode
  dominates. Models are at initialization: the cost of a network evaluation does not depend on the weights.

    python benchmarks/stage2.py            # all cases, ~2-4 min on 2 shared cores
    python benchmarks/stage2.py --quick    # smaller batches, fewer repeats, no S at 16x16, < 1 min

Results: ``benchmarks/results/stage2.json`` and ``stage2.md`` (``--out`` to change). Times are medians of
``--repeats`` runs after one warm-up; no timed assertions.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.bench import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLIP = (1, 17, 32, 32)  # ae_tiny's training crop: 4x temporal, 8x spatial -> latent [4, 5, 4, 4]
LATENT_CHANNELS = 4  # ae_tiny's z_channels, the DiT's in_channels


def timed(fn: Callable[[], object], repeats: int, matmul: bool = False) -> dict:
    """Median/min seconds of ``fn`` after one warm-up call; with ``matmul`` also the best matmul FLOP/s."""
    from cadiff.train.logging import measure_matmul_flops

    start = time.perf_counter()
    fn()  # warm-up: oneDNN primitive creation, allocator growth
    warmup = time.perf_counter() - start
    times, rates = [], []
    for _ in range(repeats):
        if matmul:
            rates.append(measure_matmul_flops())
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out = {"median_s": statistics.median(times), "min_s": min(times), "warmup_s": warmup}
    if matmul:
        out["matmul_flops"] = max(rates)
    return out


def build_autoencoder():
    """The ``ae_tiny`` DiffusionAutoencoder at initialization, in eval mode."""
    from cadiff.config import compose
    from cadiff.models.registry import build_model

    # the pixel noise level only scales an analytic term: any value measures the same decoding cost
    return build_model(compose("train_ae", ["experiment=ae_tiny", "model.noise_std=0.25"]).model).eval()


def build_dit(size: str):
    """A ``LatentDiffusion`` of DiT ``size`` on ``LATENT_CHANNELS``-channel latents (``experiment=dit_tiny``)."""
    from cadiff.config import compose
    from cadiff.models.registry import build_model

    overrides = ["experiment=dit_tiny", f"model.in_channels={LATENT_CHANNELS}", f"model.size={size}"]
    return build_model(compose("train_latent", overrides).model)


def bench_encode(batch: int, repeats: int) -> dict:
    """Clips/s of ``encode`` (posterior mean) on ``batch`` clips of shape ``CLIP``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build_autoencoder()
    x = torch.randn(batch, *CLIP, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = model.encode(x)
        t = timed(lambda: model.encode(x), repeats, matmul=True)
    with torch.device("meta"):
        twin = build_autoencoder()
        probe = torch.zeros(1, *CLIP)
    with FlopCounterMode(display=False) as counter:
        twin.encoder(probe)
    flops = float(counter.get_total_flops())
    clips_per_s = batch / t["median_s"]
    return {"case": "encode", "model": "ae_tiny encoder", "clip": list(CLIP), "batch": batch,
            "latent": list(latent.shape[1:]), "params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
            "gflop_per_clip": flops / 1e9, "clips_per_s": clips_per_s, "step_s": t["median_s"],
            "warmup_s": t["warmup_s"], "matmul_gflops": t["matmul_flops"] / 1e9,
            "ratio_to_matmul": flops * clips_per_s / t["matmul_flops"]}


def bench_train(size: str, latent: tuple[int, int, int, int], batch: int, repeats: int) -> dict:
    """Tokens/s and MFU of DiT ``size`` training steps (loss, backward) on ``batch`` latents of ``latent``."""
    import torch

    torch.manual_seed(0)
    model = build_dit(size)
    z = torch.randn(batch, *latent)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss, _ = model.training_loss(z, gen)
        loss.backward()
        model.zero_grad(set_to_none=True)

    t = timed(step, repeats, matmul=True)
    tokens = math.prod(model.dit.token_grid(latent))
    flops = model.flops_per_sample(latent)
    samples_per_s = batch / t["median_s"]
    achieved = 3.0 * flops * samples_per_s
    return {"case": "train", "size": size, "latent": list(latent), "batch": batch,
            "patch_size": list(model.dit.patch_size), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens_per_sample": tokens, "gflop_fwd_per_sample": flops / 1e9, "step_s": t["median_s"],
            "step_min_s": t["min_s"], "warmup_s": t["warmup_s"], "samples_per_s": samples_per_s,
            "tokens_per_s": tokens * samples_per_s, "achieved_gflops": achieved / 1e9,
            "matmul_gflops": t["matmul_flops"] / 1e9, "mfu": achieved / t["matmul_flops"]}


def bench_sample(size: str, latent: tuple[int, int, int, int], batch: int, repeats: int,
                 plan: list[tuple[str, int]], decode_steps: list[int]) -> list[dict]:
    """Seconds per clip of DiT sampling for each ``(sampler, steps)`` and of the DiffAE decode per its NFE."""
    import torch

    torch.manual_seed(0)
    dit = build_dit(size).eval()
    autoencoder = build_autoencoder()
    shape = (batch, *latent)
    rows = []
    for sampler, steps in plan:
        gen = torch.Generator().manual_seed(0)
        t = timed(partial(dit.sample, shape, sampler=sampler, num_steps=steps, generator=gen), repeats)
        rows.append({"case": "sample", "stage": f"DiT {size}", "sampler": sampler, "steps": steps,
                     "nfe": dit.last_nfe, "latent": list(latent), "batch": batch,
                     "s_per_clip": t["median_s"] / batch, "warmup_s": t["warmup_s"]})
    z = dit.sample(shape, sampler="euler", num_steps=1, generator=torch.Generator().manual_seed(0))
    clip = autoencoder.clip_shape_for(latent)
    for steps in decode_steps:
        gen = torch.Generator().manual_seed(0)
        t = timed(partial(autoencoder.decode, z, sampler="euler", num_steps=steps, generator=gen), repeats)
        rows.append({"case": "sample", "stage": "DiffAE decode (ae_tiny)", "sampler": "euler", "steps": steps,
                     "nfe": autoencoder.last_nfe, "latent": list(latent), "clip": list(clip), "batch": batch,
                     "s_per_clip": t["median_s"] / batch, "warmup_s": t["warmup_s"]})
    return rows


def to_markdown(result: dict) -> str:
    """The three result tables as markdown."""
    m = result["meta"]
    lines = [
        "# Stage-2 benchmark", "",
        f"fp32, {m['threads']} torch threads, single process, host `{m['host']}` with {m['cpus']} CPUs, torch "
        f"{m['torch']}; load average {m['load_start']} at start, {m['load_end']} at end (other jobs share the "
        f"machine; MFU and the encode ratio use a matmul measured in the same process right before each timed "
        f"step). Medians of {m['repeats']} runs after one warm-up; {'--quick' if m['quick'] else 'default'} run, "
        f"{m['wall_s']:.0f} s in all.", "",
        "## Latent encode (ae_tiny encoder, posterior mean)", "",
        "| clip | latent | batch | params (M) | GFLOP/clip | batch time (s) | clips/s | matmul GFLOP/s | "
        "fraction of matmul |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in result["encode"]:
        lines.append(f"| {'x'.join(map(str, r['clip']))} | {'x'.join(map(str, r['latent']))} | {r['batch']} | "
                     f"{r['params_m']:.2f} | {r['gflop_per_clip']:.3f} | {r['step_s']:.3f} | "
                     f"{r['clips_per_s']:.1f} | {r['matmul_gflops']:.0f} | {r['ratio_to_matmul']:.3f} |")
    lines += [
        "", "## DiT training step (flow loss + backward)", "",
        "| size | latent | patch | batch | params (M) | tokens/sample | GFLOP fwd/sample | step (s) | samples/s | "
        "tokens/s | achieved GFLOP/s | matmul GFLOP/s | MFU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in result["train"]:
        lines.append(f"| {r['size']} | {'x'.join(map(str, r['latent']))} | {'x'.join(map(str, r['patch_size']))} "
                     f"| {r['batch']} | {r['params_m']:.2f} | {r['tokens_per_sample']} | "
                     f"{r['gflop_fwd_per_sample']:.3f} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['achieved_gflops']:.1f} | {r['matmul_gflops']:.0f} | "
                     f"{r['mfu']:.3f} |")
    lines += [
        "", "## Sampling time per clip vs. NFE", "",
        "| stage | sampler | steps | NFE | latent | batch | s/clip | ms/clip per NFE |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in result["sample"]:
        lines.append(f"| {r['stage']} | {r['sampler']} | {r['steps']} | {r['nfe']} | "
                     f"{'x'.join(map(str, r['latent']))} | {r['batch']} | {r['s_per_clip']:.4f} | "
                     f"{1e3 * r['s_per_clip'] / r['nfe']:.2f} |")
    lines += ["", f"- {result['note']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and plan, < 1 min")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the matmul peak uses the same)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 1 quick, 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    small, large = (LATENT_CHANNELS, 5, 8, 8), (LATENT_CHANNELS, 5, 16, 16)  # 17x64x64 / 17x128x128 clips
    if args.quick:
        encode_batches = [8]
        train_plan = [("tiny", small, 8), ("S", small, 2)]
        sample_plan, decode_steps, sample_batch = [("euler", 5), ("euler", 20), ("heun", 10)], [8], 2
    else:
        encode_batches = [1, 8]
        train_plan = [("tiny", small, 8), ("tiny", large, 8), ("S", small, 4), ("S", large, 2)]
        sample_plan = [("euler", 5), ("euler", 10), ("euler", 20), ("euler", 50), ("heun", 10)]
        decode_steps, sample_batch = [8, 20], 2
    meta = {"threads": args.threads, "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()), "quick": args.quick, "repeats": repeats}
    start = time.perf_counter()

    encode = [bench_encode(b, repeats) for b in encode_batches]
    for r in encode:
        print(f"encode batch {r['batch']}: {r['clips_per_s']:.1f} clips/s, {r['ratio_to_matmul']:.3f} of matmul",
              flush=True)
    train = []
    for size, latent, batch in train_plan:
        r = bench_train(size, latent, batch, repeats)
        train.append(r)
        print(f"train DiT-{size} {'x'.join(map(str, latent))} batch {batch}: {r['tokens_per_s']:.0f} tokens/s, "
              f"MFU {r['mfu']:.3f}", flush=True)
    # the sampling grid is the larger DiT on the smaller latent: the case a stage-2 sample run is made of
    sample = bench_sample("S", small, sample_batch, repeats, sample_plan, decode_steps)
    for r in sample:
        print(f"sample {r['stage']} {r['sampler']} NFE {r['nfe']}: {r['s_per_clip']:.3f} s/clip", flush=True)

    meta["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    meta["wall_s"] = time.perf_counter() - start
    result = {
        "meta": meta, "encode": encode, "train": train, "sample": sample,
        "note": "A clip's end-to-end sampling time is the DiT row plus the decode row at the chosen NFEs; the "
                "decode runs the DiffAE's UNet over the full 17-frame clip at every NFE, the DiT only over the "
                "latent tokens. Latent 4x5x8x8 is the ae_tiny latent of a 17x64x64 clip, 4x5x16x16 of a "
                "17x128x128 clip.",
    }  # fmt: skip
    path = write_results(args.out, "stage2", result, to_markdown(result))
    print(f"-> {path}, .md")


if __name__ == "__main__":
    main()
