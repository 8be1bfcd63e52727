"""Long movies (jobs/sample.py num_frames=N): seams, photon-transfer gain drift, frames/s and peak RSS vs N.

Trains a tiny stage-1 DiffAE (``ae_tiny``, :func:`cadiff.bench.ae_quality.train_autoencoder`, strategy single)
and a tiny DiT on its latents (trainer step of strategy single) on simulated movies for a few dozen steps, exports
both, then runs the sample job once per N in its own subprocess (so ``ru_maxrss`` is that N's peak RSS):

- **seam ratio**: mean |change of the frame-mean intensity| between consecutive frames across decoder-window
  seams divided by the same inside windows (1 = seams are invisible in the frame-mean trace).
- **gain drift**: photon-transfer gain (:func:`cadiff.data.noise.estimate_photon_transfer`) of the last 10% of
  the frames over that of the first 10%, and each against the calibrated gain.
- **frames/s** (whole job: load, rollout, decode, TIFF + previews) and **peak RSS** per N.

    python benchmarks/long_movie.py               # N = 17, 257, 1025, 4097; ~5 min on 2 shared cores
    python benchmarks/long_movie.py --quick       # N = 17, 257; fewer training steps

Results: ``benchmarks/results/long_movie.json`` and ``long_movie.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cadiff.bench import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CLIP_FRAMES, CLIP_SIDE = 17, 32  # ae_tiny: latent [4, 5, 4, 4]


def train_models(ae_steps: int, dit_steps: int, seed: int = 0) -> tuple:
    """(stage-1 DiffAE, bench data, DiT, latent channel mean, std) trained on simulated movies."""
    from cadiff.bench.ae_quality import BenchConfig, cut_clips, simulate_data, tile_origins, train_autoencoder
    from cadiff.bench.stage2 import train_dit

    cfg = BenchConfig(clip_side=CLIP_SIDE, movie_side=64, train_movies=2, train_frames=120, test_movies=1,
                      test_clips_per_tile=1, steps=ae_steps, seed=seed, threads=torch.get_num_threads())
    data = simulate_data(cfg)
    ae, info = train_autoencoder("diffae", data, cfg)
    clips = np.concatenate([cut_clips(m, tile_origins(m.shape, CLIP_FRAMES, CLIP_SIDE), CLIP_FRAMES, CLIP_SIDE)
                            for m in data.train])
    with torch.no_grad():
        z = ae.encode(torch.from_numpy(data.to_model(clips))[:, None])
    mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4)).clamp_min(1e-6)
    dit, dit_info = train_dit((z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), dit_steps, seed)
    dit_info.pop("loss")
    return ae, data, dit, mean, std, {"ae": {k: info[k] for k in ("steps", "seconds", "final_loss")}, "dit": dit_info}


def child(stage2: str, num_frames: int, out: str, steps: int) -> None:
    """One sample job in this process; prints wall time and peak RSS as JSON."""
    from cadiff.config import compose
    from cadiff.inference.sample import run_sample

    start = time.perf_counter()
    run_sample(compose("sample", [f"stage2={stage2}", f"out={out}", "num_samples=1", f"num_frames={num_frames}",
                                  f"latent_steps={steps}", "seed=0"]))
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(stage2: Path, num_frames: int, root: Path, steps: int, gain: float) -> dict:
    import tifffile

    from cadiff.bench.stage2 import gain_drift, seam_ratio

    out = root / f"n{num_frames}"
    proc = subprocess.run([sys.executable, __file__, "--child", str(stage2), str(num_frames), str(out), str(steps)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"sample job for N={num_frames} failed:\n{proc.stderr[-3000:]}")
    row = {"num_frames": num_frames, **json.loads(proc.stdout.strip().splitlines()[-1])}
    record = json.loads((out / "samples.json").read_text())
    movie = tifffile.imread(out / "sample_000.tif")
    if movie.shape[0] != num_frames:
        raise RuntimeError(f"N={num_frames}: the TIFF has {movie.shape[0]} frames")
    row.update(frames_per_s=num_frames / row["wall_s"], chunks=record["long_movie"]["chunks"],
               seam_ratio=seam_ratio(movie, record), calibrated_gain=gain)
    if num_frames >= 320:
        row.update(gain_drift(movie))
    return row


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "-"


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Long movies (jobs/sample.py num_frames=N)", "",
             f"Tiny models trained in-process on simulated 64x64 movies (ae_tiny DiffAE {meta['train']['ae']['steps']} "
             f"steps, dit_tiny {meta['train']['dit']['steps']} steps, strategy single); samples 32x32 px, DiT chunks "
             f"of {meta['chunk']} latent frames with context {meta['context']}, latent_steps={meta['latent_steps']}. "
             f"fp32, {meta['threads']} torch threads, host with {meta['cpus']} CPUs shared with other jobs; "
             "each N is one sample job in its own process (peak RSS = that process's ru_maxrss).", "",
             "| N | chunks | wall (s) | frames/s | peak RSS (MB) | seam ratio | gain first 10% | gain last 10% | last/first |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['num_frames']} | {r['chunks']} | {r['wall_s']:.1f} | {r['frames_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {_cell(r, 'seam_ratio', '.2f')} | {_cell(r, 'gain_first', '.3f')} | "
                     f"{_cell(r, 'gain_last', '.3f')} | {_cell(r, 'last_over_first', '.3f')} |")
    lines += ["", f"Calibrated gain of the stage-1 export: {result['rows'][0]['calibrated_gain']:.3f} ADU/photon. "
              "Seam ratio: mean |change of frame mean| across decoder-window seams / inside windows."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--frames", type=int, nargs="+", default=None)
    parser.add_argument("--ae-steps", type=int, default=60)
    parser.add_argument("--dit-steps", type=int, default=60)
    parser.add_argument("--latent-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=4, metavar=("STAGE2", "N", "OUT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.child[2], int(args.child[3]))
    frames = args.frames or ([17, 257] if args.quick else [17, 257, 1025, 4097])
    steps = (20, 20) if args.quick else (args.ae_steps, args.dit_steps)
    start = time.perf_counter()
    from cadiff.bench.stage2 import export_pair

    ae, data, dit, mean, std, train_info = train_models(*steps)
    with tempfile.TemporaryDirectory(prefix="long_movie_") as tmp:
        stage2, gain = export_pair(Path(tmp), ae, data, dit, mean, std, CLIP_FRAMES, CLIP_SIDE)
        rows = []
        for n in frames:
            rows.append(measure(stage2, n, Path(tmp), args.latent_steps, gain))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"train": train_info, "chunk": 1 + (CLIP_FRAMES - 1) // ae.temporal_downsample, "latent_steps": args.latent_steps,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "host": platform.node(),
            "torch": torch.__version__, "seconds": time.perf_counter() - start}
    meta["context"] = meta["chunk"] // 2
    result = {"meta": meta, "rows": rows}
    write_results(args.out, "long_movie", result, to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
