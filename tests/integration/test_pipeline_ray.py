"""Ray Data over clip/latent shards feeding a real 2-worker Ray Train TorchTrainer (gloo, CPU)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cadiff.config import DataConfig
from cadiff.data import pipeline
from cadiff.errors import DataError

pytestmark = pytest.mark.ray


def _plain_cfg(root):
    return OmegaConf.structured(DataConfig(root=str(root), batch_size=2, flip=False))


def _digest(x) -> str:
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


def _train_loop(config):
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    seen, shapes = [], set()
    for batch in shard.iter_torch_batches(batch_size=2, drop_last=True):
        x = batch["x"]
        assert x.dtype == torch.float32
        shapes.add(tuple(x.shape))
        seen += [_digest(c.numpy()) for c in x]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"seen": seen, "shapes": sorted(shapes)}))


def test_ray_data_feeds_two_workers_disjoint_batches(ray_cluster, sim_data_root, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = _plain_cfg(sim_data_root)
    expected = {_digest(x.numpy()) for b in pipeline.torch_dataloader(sim_data_root, "train", cfg, mode="indexed",
                                                                      batch_size=1) for x in b}
    assert len(expected) == 15
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        datasets={"train": pipeline.clip_dataset(sim_data_root, "train", cfg, seed=0)},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="ingest"),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["shapes"] == [[2, 1, 17, 32, 32]] and len(r["seen"]) == 6  # 15 rows split 7/7 (equal), batch 2
        assert set(r["seen"]) <= expected and len(set(r["seen"])) == len(r["seen"])
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])


def test_ray_clip_dataset_crops_and_corrupt_shards(ray_cluster, sim_data_root, tmp_path):
    cfg = OmegaConf.structured(DataConfig(batch_size=2, crop_frames=9, crop_height=16, crop_width=16))
    batches = list(pipeline.clip_dataset(sim_data_root, "val", cfg).iter_torch_batches(batch_size=5))
    assert [tuple(b["x"].shape) for b in batches] == [(5, 1, 9, 16, 16)]
    root = tmp_path / "copy"
    shutil.copytree(sim_data_root, root)
    bad = root / "train" / "clips-000002.tar"
    bad.write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match="clips-000002.tar"):
        pipeline.clip_dataset(root, "train", cfg)
    skip = OmegaConf.structured(DataConfig(corrupt_shards="skip", flip=False))
    rows = pipeline.clip_dataset(root, "train", skip).take_all()
    assert len(rows) == 11 and rows[0]["x"].shape == (1, 17, 32, 32)  # 15 clips minus the 4 in the bad shard


def test_ray_latent_dataset_normalizes_per_channel(ray_cluster, tmp_path):
    from cadiff.data.shards import write_index, write_shards

    rng = np.random.default_rng(0)
    mean, std = np.array([1.0, -2.0, 3.0]), np.array([0.5, 2.0, 4.0])
    samples = [(f"z{i:02d}", (rng.standard_normal((3, 2, 4, 4)) * std[:, None, None, None]
                               + mean[:, None, None, None]).astype(np.float16), {"source": "sim"}) for i in range(40)]
    infos = write_shards(samples, tmp_path, "train", "latents", clips_per_shard=16)
    write_index(tmp_path, {"kind": "latents", "latent_shape": [3, 2, 4, 4], "dtype": "float16",
                           "splits": {"train": {"shards": infos, "num_clips": 40}}, "sources": {},
                           "channel_mean": mean.tolist(), "channel_std": std.tolist(), "stage1": "r1"})
    ds = pipeline.latent_dataset(tmp_path, "train", OmegaConf.create({"batch_size": 4, "corrupt_shards": "fail"}))
    x = np.concatenate([b["x"].numpy() for b in ds.iter_torch_batches(batch_size=8)])
    assert x.shape == (40, 3, 2, 4, 4) and x.dtype == np.float32
    per_channel = x.transpose(1, 0, 2, 3, 4).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(1), 0.0, atol=0.15)
    np.testing.assert_allclose(per_channel.std(1), 1.0, atol=0.15)
