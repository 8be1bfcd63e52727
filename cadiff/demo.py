"""``make demo``: simulated data through the whole pipeline on a local Ray cluster, one job after another.

Each step is the same command a user would type (jobs/*.py in a subprocess), and each reuses its previous
outputs when re-run: prepare_data returns at once when its data is up to date (``overwrite=true``: rebuilt when a
simulator default changed), training resumes from its run folder (a finished run only re-exports),
encode_latents skips an up-to-date latent set. Training runs are named ``demo-<tag>``, the tag
a digest of the composed data and training configs: after an upgrade that changes a default, the demo trains
fresh runs instead of refusing to resume a run recorded with the old config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from cadiff.config import compose, to_dict

REPO = Path(__file__).resolve().parents[1]
# Enough simulated movies that the DiT cannot memorise its training latents (issue 13): 48 movies of 119 frames,
# split by movie (val_fraction 0.25) -> 36 training movies x 7 clips = 252 latents; the former 4 movies of 200
# frames gave 33, and the DiT ended at train loss 1.0 against val loss 2.5. Simulating them costs ~0.3 s a movie.
SIM_MOVIES, SIM_FRAMES = 48, 119
LONG_FRAMES = 257  # the long movie: 1 + 64 x 4 frames (ae_tiny's temporal downsample), 25.7 s at the sim's 10 Hz
# The mask-conditioned sample asks for the cells of a simulated movie the models never saw (prepare_data simulates
# seeds 0..SIM_MOVIES-1): jobs/export.py writes its ground truth, whose `rois` the sample job reads as its mask. It is
# a long movie too, so a cell detector (suite2p: benchmarks/suite2p_judge.py) can check the cells it asked for.
MASK_SEED = 1000
MASK_GUIDANCE = 2.0


def demo_steps(out: Path, ae_steps: int, dit_steps: int, num_samples: int, workers: int,
               run_name: str | None = None) -> list[tuple[str, list[str]]]:
    """The pipeline as (job, overrides) pairs; ``run_name`` None: ``demo-<config tag>``."""
    data, latents, runs = out / "data", out / "latents", out / "runs"
    name = run_name or "demo"
    crop = compose("train_ae", ["experiment=ae_tiny"]).data  # samples are the stage-1 crop's size: so is the mask
    steps = [
        ("prepare_data", ["source=sim", f"source.num_movies={SIM_MOVIES}", f"source.frames={SIM_FRAMES}", f"out={data}",
                          "overwrite=true"]),
        ("train_ae", ["experiment=ae_tiny", f"data.root={data}", f"run_name={name}", f"out_root={runs}",
                      f"trainer.max_steps={ae_steps}", f"trainer.num_workers={workers}", "strategy=ddp"]),
        ("encode_latents", [f"stage1={runs}/train_ae/{name}", f"data.root={data}", f"out={latents}",
                            "overwrite=true"]),
        ("train_latent", ["experiment=dit_tiny", f"latents.root={latents}", f"run_name={name}", f"out_root={runs}",
                          f"trainer.max_steps={dit_steps}", f"trainer.num_workers={workers}", "strategy=ddp",
                          "model.cond_mask=true", "latents.mask_subgrid=4"]),
        ("sample", [f"stage2={runs}/train_latent/{name}", f"num_samples={num_samples}", "seed=0", f"out={out / 'samples'}",
                    "overwrite=true"]),
        ("evaluate", [f"gen={out / 'samples'}", f"ref={data}", f"out={out / 'eval'}"]),
        ("sample", [f"stage2={runs}/train_latent/{name}", "num_samples=1", f"num_frames={LONG_FRAMES}", "seed=0",
                    f"out={out / 'samples_long'}", "overwrite=true"]),
        ("export", ["source=sim", f"source.seed={MASK_SEED}", "source.num_movies=1", f"source.frames={LONG_FRAMES}",
                    f"source.height={crop.crop_height}", f"source.width={crop.crop_width}", "formats=[tiff]",
                    f"out={out / 'mask_source'}", "overwrite=true"]),
        ("sample", [f"stage2={runs}/train_latent/{name}", "num_samples=1", f"num_frames={LONG_FRAMES}", "seed=0",
                    f"mask={mask_file(out)}", f"guidance_scale={MASK_GUIDANCE}", f"out={out / 'samples_mask'}",
                    "overwrite=true"]),
    ]
    if run_name is None:
        return demo_steps(out, ae_steps, dit_steps, num_samples, workers, f"demo-{config_tag(steps)}")
    return steps


def mask_file(out: Path) -> Path:
    """The ground truth of the mask source movie (jobs/export.py names movie 0 ``sim-000``)."""
    return out / "mask_source" / "tiff" / "sim-000.npz"


def config_tag(steps: list[tuple[str, list[str]]]) -> str:
    """Digest of the composed configs of the data and training steps (run names left out)."""
    digest = hashlib.sha256()
    for job, overrides in steps:
        if job in ("prepare_data", "train_ae", "train_latent"):
            cfg = to_dict(compose(job, [o for o in overrides if not o.startswith("run_name=")]))
            cfg.pop("run_name", None)
            digest.update(json.dumps([job, cfg], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:8]


PROGRESS = re.compile(r"step \d+/\d+ \|.*ETA \S+")  # the training progress line (cadiff.train.logging.ProgressLine)


def _run_streaming(cmd: list[str]) -> tuple[int, list[str]]:
    """Run a job, echoing its progress lines as they come; returns (exit code, all output lines)."""
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            match = PROGRESS.search(line)
            if match:
                print(f"[demo]     {match.group(0)}", flush=True)
        code = proc.wait()
    return code, [line for line in lines if line.strip()]


def run_demo(out: Path, ae_steps: int, dit_steps: int, num_samples: int, workers: int) -> int:
    """Run every step; stop at the first failure. Returns a process exit code."""
    t_all = time.monotonic()
    steps = demo_steps(out, ae_steps, dit_steps, num_samples, workers)
    for job, overrides in steps:
        t0 = time.monotonic()
        cmd = [sys.executable, str(REPO / "jobs" / f"{job}.py"), *overrides]
        print(f"[demo] {job}: {' '.join(cmd[1:])}", flush=True)
        code, lines = _run_streaming(cmd)
        print(f"[demo]   {lines[-1] if lines else '(no output)'}  ({time.monotonic() - t0:.0f}s)", flush=True)
        if code != 0:
            print("\n".join(lines[-60:]), flush=True)
            print(f"[demo] {job} failed (exit {code})", flush=True)
            return code
    print(f"[demo] done in {time.monotonic() - t_all:.0f}s", flush=True)
    print(f"[demo] samples (TIFF/GIF/MP4): {out / 'samples'}", flush=True)
    print(f"[demo] long movie, {LONG_FRAMES} frames (TIFF/GIF/MP4): {out / 'samples_long'}", flush=True)
    print(f"[demo] sample for the cells of {mask_file(out)} (TIFF/GIF/MP4): {out / 'samples_mask'}", flush=True)
    print("[demo] reports (self-contained HTML, open in a browser):", flush=True)
    for label, path in report_paths(steps):
        print(f"[demo]   {label:<15} {path}", flush=True)
    return 0


def report_paths(steps: list[tuple[str, list[str]]]) -> list[tuple[str, Path]]:
    """(job, report.html path) of each step that writes one: the training runs and the evaluation."""
    paths = []
    for job, overrides in steps:
        values = dict(o.split("=", 1) for o in overrides)
        if job in ("train_ae", "train_latent"):
            paths.append((job, Path(values["out_root"]) / job / values["run_name"] / "report.html"))
        elif job == "evaluate":
            paths.append((job, Path(values["out"]) / "report.html"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument("--ae-steps", type=int, default=300)
    parser.add_argument("--dit-steps", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    return run_demo(args.out.resolve(), args.ae_steps, args.dit_steps, args.num_samples, args.workers)


if __name__ == "__main__":
    sys.exit(main())
