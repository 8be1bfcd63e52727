"""Datasets over clip/latent shards: Ray Data for training workers, plus single-process debugging paths.

Every path yields the column/tensor ``x`` as float32: clips ``[1, T, H, W]`` normalized in photon units
(``movie.normalize`` with the per-source calibration of ``index.json``), latents ``[C, T, H, W]``
normalized per channel with the latent index's ``channel_mean``/``channel_std``, followed by one channel per
stage-2 condition the latent index lists (``conditioning``: ROI map, flux; NaN where a clip lacks it), so
conditions reach the model through every path without a second column.

- :func:`clip_dataset` / :func:`latent_dataset`: ``ray.data.Dataset`` (shard list -> one ``map_batches`` task per shard:
  decode, crop/flip, normalize). Ray Train splits the ``train`` dataset across workers, so each worker
  reads distinct rows (``get_dataset_shard("train").iter_torch_batches(batch_size=..., drop_last=True)``).
  Shard order is seeded; within-shard order, crops and flips are fresh per epoch (not bitwise reproducible).
- :func:`deterministic_batches`: fixed per-rank sample assignment, seeded per-epoch order and augmentation,
  resumable at any batch (``start_batch``) - the path for exact resume (``data.deterministic=true``).
- :func:`torch_dataloader`: a torch ``DataLoader`` over WebDataset (sequential) or over
  :class:`~cadiff.data.shards.IndexedShards` (random access).
- :func:`val_batch`: the first ``n`` validation clips, centre-cropped: a fixed batch for validation and videos.

Corrupt shards: ``corrupt_shards=fail`` raises a DataError naming the shard, ``skip`` logs it and drops it (the
count is logged and kept in :data:`SKIPPED_SHARDS`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cadiff import storage
from cadiff.data.conditioning import condition_channels
from cadiff.data.movie import normalize
from cadiff.data.shards import IndexedShards, _decode, index_shape, iter_shard, read_index, split_shards
from cadiff.errors import DataError

log = logging.getLogger(__name__)

SKIPPED_SHARDS: list[str] = []  # shards dropped by corrupt_shards=skip in this process


def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    try:
        return getattr(cfg, key, default)
    except Exception:  # noqa: BLE001 - OmegaConf struct configs raise on unknown keys
        return default


def _corrupt_mode(cfg: Any) -> str:
    mode = _opt(cfg, "corrupt_shards", "fail")
    if mode not in ("fail", "skip"):
        raise DataError(f"corrupt_shards = {mode!r}: expected 'fail' or 'skip'")
    return mode


def _check_shards(paths: list[str | Path], mode: str) -> list[str | Path]:
    """Header-scan every shard up front: ``fail`` raises on the first bad one, ``skip`` drops and counts them."""
    good = []
    for path in paths:
        try:
            IndexedShards._scan(path)
            good.append(path)
        except (DataError, OSError) as exc:
            if mode == "fail":
                raise DataError(f"{exc} (set corrupt_shards=skip to drop bad shards)") from exc
            log.warning("skipping corrupt shard %s: %s", path, exc)
            SKIPPED_SHARDS.append(str(path))
    if len(good) < len(paths):
        log.warning("skipped %d of %d shards as corrupt", len(paths) - len(good), len(paths))
    return good


# ---------------------------------------------------------------------------------------------------------
# transforms shared by every path


def crop_size(shape: tuple[int, ...], cfg: Any) -> tuple[int, int, int]:
    """Crop ``(T, H, W)`` from ``crop_frames/height/width`` (None: the stored size); must fit the clip."""
    stored = shape[-3:]
    crop = tuple(_opt(cfg, k) or s for k, s in zip(("crop_frames", "crop_height", "crop_width"), stored))
    if any(c > s for c, s in zip(crop, stored)):
        raise DataError(f"crop {crop} is larger than the stored clips {tuple(stored)}; expected crop <= clip size")
    return crop  # type: ignore[return-value]


class ClipTransform:
    """uint16 clip ``[T, H, W]`` -> float32 ``[1, t, h, w]``: random (train) or centre crop, flips, normalize."""

    def __init__(self, index: dict, cfg: Any, train: bool) -> None:
        self.sources = index["sources"]
        self.norm = index["normalization"]
        self.crop = crop_size(index_shape(index), cfg)
        self.train = train
        self.flip = bool(_opt(cfg, "flip", True)) and train

    def __call__(self, clip: np.ndarray, meta: dict, rng: np.random.Generator | None) -> np.ndarray:
        source = _source_of(meta)
        if source not in self.sources:
            raise DataError(f"clip from source {source!r} has no calibration in index.json (sources: {sorted(self.sources)})")
        offsets = []
        for size, full in zip(self.crop, clip.shape):
            room = full - size
            offsets.append(int(rng.integers(0, room + 1)) if (self.train and rng is not None and room) else room // 2)
        t0, y0, x0 = offsets
        ct, ch, cw = self.crop
        out = clip[t0: t0 + ct, y0: y0 + ch, x0: x0 + cw]
        if self.flip and rng is not None:
            # spatial flips only: time reversal would turn calcium decays into rises
            if rng.random() < 0.5:
                out = out[:, ::-1, :]
            if rng.random() < 0.5:
                out = out[:, :, ::-1]
        return normalize(np.ascontiguousarray(out), self.sources[source], self.norm)[None]


class LatentTransform:
    """float16/32 latent ``[C, T, H, W]`` -> float32, normalized per channel, followed by the channels of the
    conditions the latent index lists (``index["conditioning"]``, :func:`cadiff.data.conditioning.condition_channels`;
    the ROI map as ``mask_subgrid^2`` planes)."""

    def __init__(self, index: dict, mask_subgrid: int = 1) -> None:
        self.mean = np.asarray(index["channel_mean"], dtype=np.float32)[:, None, None, None]
        self.std = np.asarray(index["channel_std"], dtype=np.float32)[:, None, None, None]
        self.conditions = list(index.get("conditioning", []))
        self.mask_subgrid = int(mask_subgrid)

    def __call__(self, latent: np.ndarray, meta: dict, rng: Any = None) -> np.ndarray:
        z = ((latent.astype(np.float32) - self.mean) / self.std).astype(np.float32)
        if not self.conditions:
            return z
        where = f"latent of {_source_of(meta)} t0={meta.get('t0')} y0={meta.get('y0')} x0={meta.get('x0')}"
        return np.concatenate([z, condition_channels(meta, self.conditions, z.shape, where, self.mask_subgrid)])


def latent_stats(index: dict) -> tuple[Tensor, Tensor]:
    """The per-channel ``(mean, std)``, float32 ``[C]``, a latent index (or a stage-2 export's data info, which
    copies it) normalizes its latents with: what :class:`LatentTransform` subtracts and divides by."""
    return tuple(torch.tensor(index[key], dtype=torch.float32) for key in ("channel_mean", "channel_std"))


def normalize_latents(z: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
    """Encoder latents ``[B, C, T, H, W]`` normalized per channel by ``stats`` (mean, std ``[C]``): the tensor
    counterpart of :class:`LatentTransform`, on ``z``'s device and dtype."""
    mean, std = _channel_view(stats, z)
    return (z - mean) / std


def denormalize_latents(z: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
    """A stage-2 model's latents ``[B, C, T, H, W]`` back in the stage-1 encoder's scale, the inverse of
    :class:`LatentTransform`'s normalization by ``stats`` (:func:`latent_stats`), on ``z``'s device and dtype."""
    mean, std = _channel_view(stats, z)
    return z * std + mean


def _channel_view(stats: tuple[Tensor, Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(s.to(z).view(1, -1, 1, 1, 1) for s in stats)


def make_transform(index: dict, cfg: Any, train: bool) -> ClipTransform | LatentTransform:
    """The sample transform of an index's kind; latents take ``cfg.mask_subgrid`` (the ``latents`` config)."""
    if index["kind"] == "clips":
        return ClipTransform(index, cfg, train)
    return LatentTransform(index, int(_opt(cfg, "mask_subgrid", 1)))


def _source_of(meta: dict) -> str:
    return str(meta.get("source", ""))


# ---------------------------------------------------------------------------------------------------------
# Ray Data


class _ShardToBatch:
    """``map_batches`` UDF: shard paths -> ``{"x": float32 [n, C, T, H, W]}``, one output block per shard.

    Decoding, shuffling within the shard, cropping/flipping and normalization happen in one task, so rows
    never round-trip through Arrow as uint16 first (about 2x the throughput of a flat_map + map_batches pair).
    """

    def __init__(self, index: dict, cfg: Any, train: bool, mode: str) -> None:
        self.kind, self.shape = index["kind"], index_shape(index)
        self.transform = make_transform(index, cfg, train)
        self.train, self.mode = train, mode

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng()  # fresh per call: new crops and order every epoch
        for path in batch["path"]:
            try:
                samples = [(a, m) for _k, a, m in iter_shard(str(path), self.kind, self.shape)]
            except DataError as exc:
                if self.mode == "fail":
                    raise
                log.warning("skipping corrupt shard %s: %s", path, exc)
                continue
            if not samples:
                continue
            order = rng.permutation(len(samples)) if self.train else range(len(samples))
            xs = [self.transform(samples[i][0], samples[i][1], rng) for i in order]
            yield {"x": np.stack(xs).astype(np.float32, copy=False)}


def _ray_dataset(root: str | Path, split: str, cfg: Any, seed: int, expect_kind: str) -> Any:
    import ray.data

    index = read_index(root)
    if index["kind"] != expect_kind:
        raise DataError(f"{storage.join(root, 'index.json')}: kind '{index['kind']}', expected '{expect_kind}'")
    mode = _corrupt_mode(cfg)
    paths = _check_shards([p for p, n in split_shards(root, index, split) if n > 0], mode)
    if not paths:
        raise DataError(f"{root}: split '{split}' has no readable shards")
    train = split == "train"
    if train:
        paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    items = [{"path": str(p)} for p in paths]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(_ShardToBatch(index, cfg, train, mode), batch_size=1, batch_format="numpy",
                          num_cpus=float(_opt(cfg, "cpus_per_task", 1.0)))


def clip_dataset(root: str | Path, split: str, data_cfg: Any, seed: int = 0) -> Any:
    """Ray Data dataset of normalized clips: column ``x`` float32 ``[1, T, H, W]``."""
    return _ray_dataset(root, split, data_cfg, seed, "clips")


def latent_dataset(root: str | Path, split: str, latents_cfg: Any, seed: int = 0) -> Any:
    """Ray Data dataset of per-channel-normalized latents: column ``x`` float32 ``[C, T, H, W]``."""
    return _ray_dataset(root, split, latents_cfg, seed, "latents")


# ---------------------------------------------------------------------------------------------------------
# deterministic, resumable per-rank batches


def _indexed(root: str | Path, split: str, cfg: Any, kind: str) -> tuple[dict, IndexedShards]:
    index = read_index(root)
    if index["kind"] != kind:
        raise DataError(f"{storage.join(root, 'index.json')}: kind '{index['kind']}', expected '{kind}'")
    mode = _corrupt_mode(cfg)
    good = set(_check_shards([p for p, _ in split_shards(root, index, split)], mode))
    return index, IndexedShards(root, split, index, keep=good)


def _sample_rng(seed: int, epoch: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, sample])


def deterministic_batches(root: str | Path, split: str, data_cfg: Any, rank: int, world_size: int, seed: int,
                          start_batch: int = 0, kind: str = "clips") -> Iterator[Any]:
    """Infinite per-rank batches ``[B, C, T, H, W]`` (torch float32), exactly reproducible and resumable.

    Samples are assigned to ranks once (seeded permutation, equal counts, remainder dropped); each epoch
    visits the rank's samples in an order seeded by ``(seed, rank, epoch)``; augmentation is seeded per
    ``(seed, epoch, sample)``. Batch ``k`` is the same whether reached by iterating or via ``start_batch=k``.
    """
    import torch

    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world size {world_size}")
    batch_size = int(_opt(data_cfg, "batch_size", 1))
    index, data = _indexed(root, split, data_cfg, kind)
    transform = make_transform(index, data_cfg, train=split == "train")
    per_rank = len(data) // world_size
    if per_rank < batch_size:
        raise DataError(f"{root}: split '{split}' has {len(data)} samples, fewer than batch_size {batch_size} x "
                        f"{world_size} ranks; prepare more clips or lower the batch size")
    mine = np.random.default_rng(seed).permutation(len(data))[rank * per_rank: (rank + 1) * per_rank]
    batches_per_epoch = per_rank // batch_size
    step = int(start_batch)
    while True:
        epoch, within = divmod(step, batches_per_epoch)
        order = mine[np.random.default_rng([seed, rank, epoch]).permutation(per_rank)]
        ids = order[within * batch_size: (within + 1) * batch_size]
        xs = []
        for sample in ids:
            _key, array, meta = data[int(sample)]
            xs.append(transform(array, meta, _sample_rng(seed, epoch, int(sample))))
        yield torch.from_numpy(np.stack(xs))
        step += 1


# ---------------------------------------------------------------------------------------------------------
# torch DataLoader paths (single process debugging and the ingest benchmark)


class IndexedClipDataset:
    """Map-style torch dataset over :class:`IndexedShards` (random access), returning ``x`` tensors."""

    def __init__(self, root: str | Path, split: str, cfg: Any, kind: str = "clips", seed: int = 0) -> None:
        self.index, self.data = _indexed(root, split, cfg, kind)
        self.transform = make_transform(self.index, cfg, train=split == "train")
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        import torch

        _key, array, meta = self.data[i]
        return torch.from_numpy(self.transform(array, meta, _sample_rng(self.seed, self.epoch, i)))


def _wds_pipeline(paths: list[Path], index: dict, cfg: Any, train: bool, mode: str, seed: int,
                  rank: int, world_size: int) -> Any:
    import torch
    import webdataset as wds

    member = "clip.npy" if index["kind"] == "clips" else "latent.npy"
    shape = index_shape(index)
    transform = make_transform(index, cfg, train)
    mine = [str(p) for i, p in enumerate(paths) if i % world_size == rank]
    if not mine:
        raise DataError(f"rank {rank}/{world_size}: no shards assigned ({len(paths)} shards in total)")

    def handler(exc: Exception) -> bool:
        if mode == "skip":
            log.warning("skipping corrupt shard data: %s", exc)
            SKIPPED_SHARDS.append(str(exc))
            return True
        raise DataError(f"corrupt shard: {exc}") from exc

    def decode(sample: dict) -> Any:
        url = sample.get("__url__", "?")
        raw = {member: sample[member], "meta.json": sample["meta.json"]} if member in sample else {}
        if not raw or "meta.json" not in sample:
            raise DataError(f"{url}: sample {sample.get('__key__')!r} lacks {member}/meta.json")
        _k, array, meta = _decode(Path(url), sample["__key__"], raw, index["kind"], shape)
        rng = np.random.default_rng([seed, zlib.crc32(sample["__key__"].encode())]) if train else None
        return torch.from_numpy(transform(array, meta, rng))

    return (wds.WebDataset(mine, handler=handler, shardshuffle=(len(mine) if train else False), seed=seed,
                           nodesplitter=None, workersplitter=wds.split_by_worker, empty_check=False)
            .shuffle(64 if train else 0, seed=seed)
            .map(decode, handler=handler))


def torch_dataloader(root: str | Path, split: str, data_cfg: Any, mode: str = "webdataset", num_workers: int = 0,
                     seed: int = 0, kind: str = "clips", rank: int = 0, world_size: int = 1,
                     batch_size: int | None = None) -> Any:
    """A torch ``DataLoader`` of ``x`` batches: ``mode="webdataset"`` (streaming) or ``"indexed"`` (random access)."""
    import torch
    from torch.utils.data import DataLoader

    train = split == "train"
    batch_size = batch_size or int(_opt(data_cfg, "batch_size", 1))
    if mode == "indexed":
        dataset = IndexedClipDataset(root, split, data_cfg, kind, seed)
        if world_size > 1:
            subset = list(range(rank, len(dataset), world_size))
            dataset = torch.utils.data.Subset(dataset, subset)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
                          generator=generator, persistent_workers=num_workers > 0)
    if mode != "webdataset":
        raise DataError(f"torch_dataloader mode {mode!r}: expected 'webdataset' or 'indexed'")
    index = read_index(root)
    if index["kind"] != kind:
        raise DataError(f"{storage.join(root, 'index.json')}: kind '{index['kind']}', expected '{kind}'")
    corrupt = _corrupt_mode(data_cfg)
    paths = _check_shards([p for p, n in split_shards(root, index, split) if n > 0], corrupt)
    dataset = _wds_pipeline(paths, index, data_cfg, train, corrupt, seed, rank, world_size)
    return DataLoader(dataset.batched(batch_size, collation_fn=_stack, partial=not train), batch_size=None,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


def _stack(samples: list) -> Any:
    import torch

    return torch.stack(samples)


def val_batch(root: str | Path, n: int, data_cfg: Any, kind: str = "clips") -> Any:
    """The first ``n`` validation samples (index order), centre-cropped and normalized: ``[n, C, T, H, W]``.

    Falls back to the train split when there is no validation data (a single short recording).
    """
    import torch

    index = read_index(root)
    if index["kind"] != kind:
        raise DataError(f"{storage.join(root, 'index.json')}: kind '{index['kind']}', expected '{kind}'")
    split = "val" if index["splits"].get("val", {}).get("num_clips", 0) > 0 else "train"
    if split == "train":
        log.warning("%s has no validation clips; val_batch uses the first training clips", root)
    transform = make_transform(index, data_cfg, train=False)
    xs: list[np.ndarray] = []
    for path, _count in split_shards(root, index, split):
        for _key, array, meta in iter_shard(path, kind, index_shape(index)):
            xs.append(transform(array, meta, None))
            if len(xs) >= n:
                return torch.from_numpy(np.stack(xs))
    if not xs:
        raise DataError(f"{root}: no clips in split '{split}'")
    log.warning("%s: asked for %d validation clips, only %d exist", root, n, len(xs))
    return torch.from_numpy(np.stack(xs))
