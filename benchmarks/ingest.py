"""Ingest benchmark: clips/s and MB/s of the Ray Data pipeline vs. torch DataLoaders over the same shards.

Consumers are separate processes reading disjoint parts of the train split, as training workers would:
- ``ray``: ``clip_dataset(...).streaming_split(n, equal=True)``, each split iterated by a Ray task with
  ``iter_torch_batches`` (what ``ray.train.get_dataset_shard`` does inside a TorchTrainer);
- ``torch-wds`` / ``torch-indexed``: one process per consumer, each with ``torch_dataloader(rank, world_size)``
  over WebDataset (streaming) or the indexed shards (random access), one loader worker each.
MB/s counts the stored uint16 bytes of the clips delivered. The first epoch is a warm-up (Ray worker start,
page cache) and is excluded. Results: ``benchmarks/results/ingest.json`` and ``ingest.md``.

    python benchmarks/ingest.py                  # ~1-2 min on 2 cores
    python benchmarks/ingest.py --movies 16 --epochs 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.bench import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _data_cfg(batch_size: int):
    from omegaconf import OmegaConf

    from cadiff.config import DataConfig

    return OmegaConf.structured(DataConfig(batch_size=batch_size, flip=True))


def _torch_consumer(root: str, mode: str, rank: int, world: int, batch_size: int, epochs: int, queue) -> None:
    import torch

    from cadiff.data.pipeline import torch_dataloader

    torch.set_num_threads(1)
    loader = torch_dataloader(root, "train", _data_cfg(batch_size), mode=mode, num_workers=1, seed=rank,
                              rank=rank, world_size=world)
    times, counts = [], []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += batch.shape[0]
        times.append(time.perf_counter() - start)
        counts.append(n)
    queue.put((times, counts))


def bench_torch(root: str, mode: str, consumers: int, batch_size: int, epochs: int) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_torch_consumer, args=(root, mode, r, consumers, batch_size, epochs, queue))
             for r in range(consumers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return _combine(results)


def _combine(results: list[tuple[list[float], list[int]]]) -> dict:
    """Steady state: epochs after the first; the slowest consumer bounds each epoch's wall time."""
    epochs = len(results[0][0])
    first = 1 if epochs > 1 else 0
    wall = sum(max(r[0][e] for r in results) for e in range(first, epochs))
    clips = sum(sum(r[1][first:]) for r in results)
    return {"clips": clips, "seconds": wall, "warmup_seconds": max(r[0][0] for r in results)}


def bench_ray(root: str, consumers: int, batch_size: int, epochs: int) -> dict:
    import ray

    from cadiff.data.pipeline import clip_dataset

    @ray.remote(num_cpus=0.5)
    def consume(iterator, batch_size: int, epochs: int):
        times, counts = [], []
        for _ in range(epochs):
            start, n = time.perf_counter(), 0
            for batch in iterator.iter_torch_batches(batch_size=batch_size, drop_last=True):
                n += batch["x"].shape[0]
            times.append(time.perf_counter() - start)
            counts.append(n)
        return times, counts

    ds = clip_dataset(root, "train", _data_cfg(batch_size), seed=0)
    splits = ds.streaming_split(consumers, equal=True)
    return _combine(ray.get([consume.remote(it, batch_size, epochs) for it in splits]))


def prepare(root: Path, movies: int, frames: int) -> dict:
    from cadiff.config import compose
    from cadiff.data.prepare import prepare_data

    overrides = ["source=sim", f"source.num_movies={movies}", f"source.frames={frames}", "source.height=64",
                 "source.width=64", "clip.frames=17", "clip.height=64", "clip.width=64", "clips_per_shard=16",
                 "val_fraction=0", f"out={root}"]
    return prepare_data(compose("prepare_data", overrides))


def to_markdown(result: dict) -> str:
    lines = [
        "# Ingest benchmark", "",
        f"{result['num_clips']} train clips of {result['clip_shape']} uint16 ({result['clip_mb']:.3f} MB each), "
        f"batch {result['batch_size']}, {result['epochs']} epochs (first excluded), host `{result['host']}` "
        f"with {result['cpus']} CPUs.", "",
        "| pipeline | consumers | clips/s | MB/s | warm-up epoch (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['pipeline']} | {row['consumers']} | {row['clips_per_s']:.1f} | {row['mb_per_s']:.1f} | "
                     f"{row['warmup_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--movies", type=int, default=16)
    parser.add_argument("--frames", type=int, default=340, help="frames per simulated movie (20 clips of 17)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", type=Path, default=None, help="existing clip shards (default: simulate)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import numpy as np

    from cadiff.data.shards import read_index

    with tempfile.TemporaryDirectory(prefix="cadiff-ingest-") as tmp:
        root = args.data or Path(tmp) / "data"
        if args.data is None:
            prepare(root, args.movies, args.frames)
        index = read_index(root)
        shape = index["clip_shape"]
        clip_mb = int(np.prod(shape)) * 2 / 1e6
        rows = []
        for mode in ("webdataset", "indexed"):
            for n in args.consumers:
                r = bench_torch(str(root), mode, n, args.batch_size, args.epochs)
                rows.append({"pipeline": f"torch-{'wds' if mode == 'webdataset' else 'indexed'}", "consumers": n, **r})
                print(f"torch {mode} x{n}: {r['clips'] / r['seconds']:.1f} clips/s", flush=True)
        import ray

        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        try:
            for n in args.consumers:
                r = bench_ray(str(root), n, args.batch_size, args.epochs)
                rows.append({"pipeline": "ray-data", "consumers": n, **r})
                print(f"ray data x{n}: {r['clips'] / r['seconds']:.1f} clips/s", flush=True)
        finally:
            ray.shutdown()
    for row in rows:
        row["clips_per_s"] = row["clips"] / row["seconds"] if row["seconds"] > 0 else float("nan")
        row["mb_per_s"] = row["clips_per_s"] * clip_mb
    result = {"num_clips": index["splits"]["train"]["num_clips"], "clip_shape": shape, "clip_mb": clip_mb,
              "batch_size": args.batch_size, "epochs": args.epochs, "cpus": os.cpu_count(), "host": platform.node(),
              "python": platform.python_version(), "rows": rows}
    write_results(args.out, "ingest", result, to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
