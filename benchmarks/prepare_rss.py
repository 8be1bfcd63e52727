"""Peak RSS of prepare_data on a big memory-mapped movie (issue 2: 2000x512x512 uint16 in < 1.5 GB).

Writes an uncompressed (memory-mappable) TIFF of Poisson-Gaussian frames chunk by chunk, then runs
``jobs/prepare_data.py source=tiff ...`` in a child process that reports its own ``VmHWM`` (peak resident set,
reset at exec; ``getrusage(RUSAGE_CHILDREN)`` would also count the pages the child inherited from this process
before exec). Results: ``benchmarks/results/prepare_rss.json`` and ``prepare_rss.md``.

    python benchmarks/prepare_rss.py                   # 2000x512x512 (1 GB movie, ~1 GB of shards)
    python benchmarks/prepare_rss.py --frames 200      # quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
LIMIT_GB = 1.5
# runs a job script as __main__, then prints the process's peak RSS (VmHWM) whatever the exit path
CHILD = """
import runpy, sys
job, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(job, run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(f"VmHWM_KB={hwm}", file=sys.stderr, flush=True)
"""


def write_movie(path: Path, frames: int, size: int, chunk: int = 50, seed: int = 0) -> None:
    """Poisson-Gaussian movie (gain 2, offset 100, read noise 2 ADU) written through a TIFF memmap."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    flux = (20 + 15 * np.sin(yy / 37.0) * np.cos(xx / 23.0)).astype(np.float32)  # spatial structure
    out = tifffile.memmap(path, shape=(frames, size, size), dtype=np.uint16, photometric="minisblack")
    for t0 in range(0, frames, chunk):
        t1 = min(frames, t0 + chunk)
        photons = rng.poisson(np.broadcast_to(flux, (t1 - t0, size, size)))
        adu = 100 + 2 * photons + rng.normal(0, 2, photons.shape)
        out[t0:t1] = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
        out.flush()
    del out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None, help="where the movie and shards go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cadiff-rss-", dir=args.workdir) as tmp:
        movie = Path(tmp) / "big.tif"
        start = time.perf_counter()
        write_movie(movie, args.frames, args.size)
        write_s = time.perf_counter() - start
        job_args = ["source=tiff", f"source.path={movie}", "source.rate_hz=30", f"out={Path(tmp) / 'shards'}",
                    "clip.frames=17", "clip.height=64", "clip.width=64"]
        cmd = [sys.executable, "-c", CHILD, str(REPO / "jobs" / "prepare_data.py"), *job_args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        prepare_s = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"prepare_data failed:\n{proc.stdout}\n{proc.stderr}")
        peak_gb = int(proc.stderr.rsplit("VmHWM_KB=", 1)[1].split()[0]) * 1024 / 1e9
        shard_gb = sum(p.stat().st_size for p in (Path(tmp) / "shards").rglob("*.tar")) / 1e9
        result = {
            "movie_shape": [args.frames, args.size, args.size], "movie_gb": movie.stat().st_size / 1e9,
            "shards_gb": shard_gb, "peak_rss_gb": peak_gb, "limit_gb": LIMIT_GB, "ok": peak_gb < LIMIT_GB,
            "prepare_seconds": prepare_s, "write_movie_seconds": write_s, "summary": proc.stdout.strip().splitlines()[-1],
            "host": platform.node(), "python": platform.python_version(),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prepare_rss.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ("# prepare_data peak RSS\n\n| movie (T,H,W) uint16 | movie GB | shards GB | peak RSS GB | limit GB | prepare s |\n"
          "|---|---:|---:|---:|---:|---:|\n"
          f"| {tuple(result['movie_shape'])} | {result['movie_gb']:.2f} | {shard_gb:.2f} | {peak_gb:.3f} | {LIMIT_GB} | "
          f"{prepare_s:.0f} |\n\n`{result['summary']}`\n")
    (args.out / "prepare_rss.md").write_text(md)
    print(md)
    if not result["ok"]:
        sys.exit(f"peak RSS {peak_gb:.2f} GB exceeds {LIMIT_GB} GB")


if __name__ == "__main__":
    main()
