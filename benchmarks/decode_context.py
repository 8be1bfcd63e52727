"""Long movies' decoder windows: seams, gain drift and wall time against the decoder's left context.

A long movie (jobs/sample.py num_frames=N) is decoded window by window, each window with ``decode_context_frames``
latent frames before the ones it keeps. For every given trained pair (a stage-2 export and the stage-1 export it
records, e.g. the generation benchmark's ``--work`` models) and every decode context (explicit frame counts, and
``default``: the job's default, one more than the stage-1 decoder's measured ``latent_reach``):

- **seam ratio** and **gain drift** of ``--movies`` sample-job movies (seeds from the pair's own seed on: the
  generation benchmark's long movies of that seed at ``decode_context_frames=2``, its earlier default), as the
  generation benchmark scores them (:func:`cadiff.bench.generation.long_movie`), their mean and standard error,
  and the job's wall time;
- **signal error**: the mechanism. One DiT rollout's latents decoded to the noise-free signal estimate
  (``denoise``) window by window and in one piece; the mean |difference| in units of the whole-movie estimate's
  mean |frame-to-frame change| (0: the windows join as if there were none), and the windowed estimate's own seam
  ratio beside the whole one's (the DiT's chunk seams alone).

    python benchmarks/decode_context.py --pair unet 0 outputs/benchmarks/generation/models/s2/export/model.pt \\
        --pair upsampler 0 outputs/benchmarks/generation_upsampler3000/models/s2/export/model.pt

Results: ``benchmarks/results/decode_context.json`` and ``decode_context.md`` (``--out``/``--name`` to change).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cadiff.bench import write_results  # noqa: E402
from cadiff.bench.stage2 import frame_mean_seam_ratio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def signal_error(stage2: Path, frames: int, contexts: list[int | None], seed: int) -> dict[str, Any]:
    """Windowed vs whole-movie signal estimate of one rollout, per decode context (None: the default)."""
    from cadiff.data.pipeline import denormalize_latents, latent_stats
    from cadiff.inference.long_movie import decode_stream, plan_long_movie, rollout_latents
    from cadiff.inference.sample import load_pair

    dit, dit_meta, _, ae, _, _ = load_pair(stage2)
    if not ae.has_signal_estimate:
        return {"reach": ae.latent_reach(), "rows": {}, "reason": "decoder_form=flow has no signal estimate"}
    c, chunk, h, w = dit_meta["data"]["sample_shape"]
    reach = ae.latent_reach()
    plan = plan_long_movie(frames, None, None, chunk, ae.temporal_downsample, reach)
    stats = latent_stats(dit_meta["data"])
    gen = torch.Generator().manual_seed(seed * 1_000_003)
    pieces = [denormalize_latents(z, stats) for z in rollout_latents(dit, plan, (1, c, h, w), "euler", 20, gen)]
    ends = np.cumsum([p.shape[2] for p in pieces])[:-1]
    seams = [int((e - 1) * plan.temporal_downsample) for e in ends]
    whole = ae.denoise(torch.cat(pieces, dim=2))[0, 0].numpy()
    scale = float(np.abs(np.diff(whole, axis=0)).mean())
    rows = {}
    for context in contexts:
        d = plan.decode_context if context is None else context
        windowed = torch.cat(list(decode_stream(lambda zw, _: ae.denoise(zw), iter(pieces), d,
                                                plan.temporal_downsample)), dim=2)[0, 0].numpy()
        rows[_name(context)] = {"decode_context": d, "error": float(np.abs(windowed - whole).mean() / scale),
                                "seam_ratio": frame_mean_seam_ratio(windowed, seams)}
    return {"reach": reach, "whole_seam_ratio": frame_mean_seam_ratio(whole, seams), "rows": rows}


def _name(context: int | None) -> str:
    return "default" if context is None else str(context)


def movies(stage2: Path, work: Path, frames: int, context: int | None, seeds: range) -> dict[str, Any]:
    """The sample job's long movies at one decode context: seam ratio and gain drift per movie, mean, SE, wall."""
    from cadiff.bench.generation import long_movie

    extra = [] if context is None else [f"decode_context_frames={context}"]
    rows = [long_movie(stage2, work / f"{_name(context)}_{s}", frames, s, *extra) for s in seeds]
    seam = np.array([r["seam_ratio"] for r in rows])
    plan = rows[0]["record"]["long_movie"]
    return {"decode_context": plan["decode_context"], "decoder_reach": plan.get("decoder_reach"),
            "seam_ratio": float(seam.mean()), "seam_ratio_sem": float(seam.std(ddof=1) / np.sqrt(len(seam))),
            "seam_each": seam.round(4).tolist(), "gain_drift": float(np.mean([r["gain_drift"] for r in rows])),
            "wall_s": float(sum(r["wall_s"] for r in rows)),
            "frames_per_s": frames * len(rows) / float(sum(r["wall_s"] for r in rows))}


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Long movies: decoder windows' left context", "",
             f"{meta['movies']} movies of {meta['frames']} frames per pair and context (seeds from the pair's seed on), "
             f"{meta['threads']} torch threads, {meta['seconds'] / 60:.1f} min in all. `default`: one more than the "
             "stage-1 decoder's measured reach (`CausalAutoencoder.latent_reach`). Seam ratio: mean |change of the "
             "frame mean| across decoder-window seams over inside windows (goal <= 1.5; 1: no seam). Signal error: "
             "one rollout's noise-free estimate decoded window by window against in one piece, mean |difference| "
             "over the whole estimate's mean |frame-to-frame change|; its seam ratio beside the whole estimate's "
             "(the DiT's chunk seams alone). `python benchmarks/decode_context.py` (see its docstring).", "",
             "| pair | seed | context | latent frames | reach | seam ratio (SE) | gain drift | wall (s) | frames/s | "
             "signal error | signal seam ratio (whole) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for pair in result["pairs"]:
        sig = pair["signal"]
        for name, row in pair["contexts"].items():
            s = sig["rows"].get(name)
            signal = (f"{s['error']:.3f} | {s['seam_ratio']:.2f} ({sig['whole_seam_ratio']:.2f})" if s
                      else f"- | - ({sig.get('reason', '')})")
            lines.append(f"| {pair['name']} | {pair['seed']} | {name} | {row['decode_context']} | {row['decoder_reach']} | "
                         f"{row['seam_ratio']:.3f} ({row['seam_ratio_sem']:.3f}) | {row['gain_drift']:.3f} | "
                         f"{row['wall_s']:.1f} | {row['frames_per_s']:.1f} | {signal} |")
    lines += ["", "Pairs (stage-2 exports):", *[f"- `{p['name']}` seed {p['seed']}: `{p['stage2']}`" for p in result["pairs"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", action="append", required=True, nargs=3, metavar=("NAME", "SEED", "STAGE2_EXPORT"),
                        help="a trained pair: its name, the seed its long movies start at, its stage-2 model.pt")
    parser.add_argument("--contexts", nargs="+", default=["2", "default"], help="frame counts and/or 'default'")
    parser.add_argument("--movies", type=int, default=8)
    parser.add_argument("--frames", type=int, default=1025)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("outputs/benchmarks/decode_context"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="decode_context")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [None if c == "default" else int(c) for c in args.contexts]
    pairs = []
    for name, seed, path in args.pair:
        if not seed.isdigit() or not Path(path).is_file():
            parser.error(f"--pair {name} {seed} {path}: expected a seed >= 0 and an existing stage-2 export (model.pt)")
        pairs.append((name, int(seed), Path(path)))
    start = time.perf_counter()
    result: dict[str, Any] = {"pairs": []}
    for name, seed, stage2 in pairs:
        seeds = range(seed, seed + args.movies)
        result["pairs"].append({
            "name": name, "seed": seed, "stage2": str(stage2),
            "contexts": {_name(c): movies(stage2, args.work / name, args.frames, c, seeds) for c in contexts},
            "signal": signal_error(stage2, args.frames, contexts, seed)})
    result["meta"] = {"movies": args.movies, "frames": args.frames, "threads": args.threads,
                      "cpus": os.cpu_count(), "host": platform.node(), "torch": torch.__version__,
                      "seconds": time.perf_counter() - start}
    result["summary"] = {p["name"]: {c: row["seam_ratio"] for c, row in p["contexts"].items()} for p in result["pairs"]}
    markdown = to_markdown(result)
    write_results(args.out, args.name, result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
