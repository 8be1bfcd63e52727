"""Latent precompute: Ray Data ``map_batches`` with an actor pool holding the stage-1 EMA encoder.

Clips are read from the clip shards, normalized exactly as in training, center-cropped to the clip shape the
encoder was trained on and encoded to the posterior mean (deterministic). Latents are stored raw (float32) in
latent shards; ``index.json`` records per-channel mean/std over the train split, which stage 2 uses to
normalize, and the stage-1 export they came from. Re-running with the same export and data (the same data
``index.json``) is a no-op; ``overwrite=true`` encodes again.

Each latent's meta carries its clip's stage-2 conditions (ROI map cropped like the clip, mean photon flux) and
``index.json`` lists those any train clip has (``conditioning``); ``pipeline.LatentTransform`` appends them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadiff.data.conditioning import CONDITIONS, FLUX_KEY, clip_flux, crop_meta_mask
from cadiff.data.movie import normalize
from cadiff.data.shards import iter_shard, read_index, write_index, write_shards
from cadiff.errors import DataError
from cadiff.io import atomic_dir, check_output_dir
from cadiff.runtime.exports import load_exported_model, resolve_job_export
from cadiff.runtime.preflight import check_cluster_paths, probe_cluster_paths, shared_paths
from cadiff.runtime.ray import init_ray

log = logging.getLogger(__name__)

PHOTON_UNITS = {"kind": "photon", "center": 0.0, "scale": 1.0}  # normalize() to plain photons


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def center_crop(clip: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Center crop in H, W and the first ``T`` frames (causal clips start at their first frame)."""
    t, h, w = shape
    if clip.shape[0] < t or clip.shape[1] < h or clip.shape[2] < w:
        raise DataError(f"clip of shape {clip.shape} is smaller than the encoder's clip shape {shape}")
    y0, x0 = (clip.shape[1] - h) // 2, (clip.shape[2] - w) // 2
    return clip[:t, y0 : y0 + h, x0 : x0 + w]


class EncoderActor:
    """Ray Data actor: holds the encoder once, maps batches of uint16 clips to latent means."""

    def __init__(self, export: str, sources: dict[str, Any], normalization: dict[str, Any], threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model, meta, _ = load_exported_model(export, "stage1", "ae")
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model.to(self.device)
        self.clip_shape = tuple(meta["data"]["sample_shape"][1:])
        self.sources = sources
        self.normalization = normalization

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        xs, metas = [], []
        for clip, source, meta in zip(batch["clip"], batch["source"], batch["meta"]):
            calib = self.sources[str(source)]
            cropped = center_crop(np.asarray(clip), self.clip_shape)
            xs.append(normalize(cropped, calib, self.normalization))
            metas.append(json.dumps(latent_meta(json.loads(str(meta)), np.asarray(clip).shape, cropped, calib,
                                                self.normalization)))
        x = torch.from_numpy(np.stack(xs)[:, None]).to(self.device)
        z = self.model.encode(x).float().cpu().numpy()
        return {"key": batch["key"], "latent": z, "meta": np.asarray(metas, dtype=object)}


def latent_meta(meta: dict[str, Any], clip_shape: tuple[int, ...], cropped: np.ndarray, calib: dict[str, Any],
                normalization: dict[str, Any]) -> dict[str, Any]:
    """A clip's meta for its latent: the ROI map centre-cropped like the clip and, for data with a photon scale,
    the clip's mean photon flux (the stage-2 conditions, :mod:`cadiff.data.conditioning`)."""
    _, h, w = cropped.shape
    where = f"clip {meta.get('source')} t0={meta.get('t0')} y0={meta.get('y0')} x0={meta.get('x0')}"
    out = crop_meta_mask(meta, (clip_shape[1] - h) // 2, (clip_shape[2] - w) // 2, h, w, where)
    if normalization["kind"] != "raw":
        out[FLUX_KEY] = clip_flux(normalize(cropped, calib, PHOTON_UNITS))
    return out


def _shard_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, clip, meta in iter_shard(row["path"]):
        out.append({"key": key, "clip": clip, "source": str(meta["source"]), "meta": json.dumps(meta)})
    return out


def encode_latents(cfg: Any) -> tuple[str, str]:
    """jobs/encode_latents.py: clip shards + stage-1 export -> latent shards + index.json."""
    import ray

    paths = shared_paths(cfg, reads=["data.root", "stage1"], writes=["out"])
    check_cluster_paths(cfg.ray, paths)
    export = resolve_job_export(cfg.stage1, "stage1")
    model, meta, _ = load_exported_model(export, "stage1", "ae")  # fail fast on a bad export
    data_root = Path(cfg.data.root).resolve()
    index = read_index(data_root)
    if index.get("kind", "clips") != "clips":
        raise DataError(f"data.root '{data_root}': expected clip shards, found kind '{index.get('kind')}'")
    clip_shape = tuple(meta["data"]["sample_shape"][1:])
    if any(s < c for s, c in zip(index["clip_shape"], clip_shape)):
        raise DataError(f"data.root '{data_root}': clips {index['clip_shape']} are smaller than the encoder's {list(clip_shape)}")
    out = Path(cfg.out)
    digest = _file_digest(export)
    data_digest = _file_digest(data_root / "index.json")  # data re-prepared in place (e.g. now with ROI maps)
    if (out / "index.json").exists() and not cfg.overwrite:
        old = read_index(out)
        if (old.get("stage1_digest") == digest and old.get("data_root") == str(data_root)
                and old.get("data_index_digest", data_digest) == data_digest):
            n = sum(s["num_clips"] for s in old["splits"].values())
            return f"{n} latents {old['latent_shape']} (up to date)", str(out)

    check_output_dir(out, "encode_latents", cfg.overwrite)  # before any work: refuse a folder it may not replace
    init_ray(cfg.ray, data_progress=True)  # the job is one Ray Data pipeline: its progress log is the job's
    probe_cluster_paths(cfg.ray, [p for p in paths if not p.write])  # the encoder actors read; this driver writes out
    latent_shape = list(model.latent_shape((1, *clip_shape)))
    splits: dict[str, Any] = {}
    total = np.zeros(latent_shape[0], np.float64)
    total_sq = np.zeros(latent_shape[0], np.float64)
    count = 0
    conditions: set[str] = set()  # stage-2 conditions carried by any train clip
    fluxes: list[float] = []  # train clips' mean photon flux: the median is the brightness a mask sample holds
    with atomic_dir(out, "encode_latents", cfg.overwrite) as tmp:
        for split, info in index["splits"].items():
            paths = [str(data_root / s["path"]) for s in info["shards"]]
            if not paths:
                splits[split] = {"shards": [], "num_clips": 0}
                continue
            ds = (
                ray.data.from_items([{"path": p} for p in paths])
                .flat_map(_shard_rows)
                .map_batches(
                    EncoderActor,
                    fn_constructor_kwargs={"export": str(export), "sources": index["sources"],
                                           "normalization": index["normalization"],
                                           "threads": max(1, int(cfg.cpus_per_actor))},
                    batch_size=cfg.batch_size,
                    compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                    num_cpus=cfg.cpus_per_actor,
                    num_gpus=cfg.gpus_per_actor or None,
                )
            )
            ds.context.execution_options.preserve_order = True

            def samples(ds=ds, split=split):
                nonlocal count
                for row in ds.iter_rows():
                    z = np.asarray(row["latent"], dtype=np.float32)
                    meta = json.loads(row["meta"])
                    if split == "train":
                        total[:] += z.reshape(z.shape[0], -1).sum(axis=1)
                        total_sq[:] += (z.astype(np.float64).reshape(z.shape[0], -1) ** 2).sum(axis=1)
                        count += z[0].size
                        conditions.update(name for name in CONDITIONS if name in meta)
                        if FLUX_KEY in meta:
                            fluxes.append(float(meta[FLUX_KEY]))
                    yield row["key"], z, meta

            shards = write_shards(samples(), tmp, split, prefix=f"latents-{split}", clips_per_shard=cfg.clips_per_shard)
            splits[split] = {"shards": shards, "num_clips": sum(s["count"] for s in shards)}
        if count == 0:
            raise DataError(f"data.root '{data_root}': the train split has no clips to compute latent statistics from")
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
        write_index(tmp, {
            "kind": "latents",
            "latent_shape": latent_shape,
            "dtype": "float32",
            "splits": splits,
            "channel_mean": mean.tolist(),
            "channel_std": std.tolist(),
            "stage1": str(export),
            "stage1_digest": digest,
            "data_root": str(data_root),
            "data_index_digest": data_digest,
            "clip_shape": list(clip_shape),
            "sources": index["sources"],
            "normalization": index["normalization"],
            "conditioning": [name for name in CONDITIONS if name in conditions],
            "flux_median": float(np.median(fluxes)) if fluxes else None,
        })
    n = sum(s["num_clips"] for s in splits.values())
    return f"{n} latents {latent_shape} std={np.round(std, 3).tolist()}", str(out)
