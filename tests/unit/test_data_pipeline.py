"""Single-process data paths: deterministic resumable batches, DataLoaders, val batch, corrupt shards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cadiff.config import DataConfig
from cadiff.data import pipeline
from cadiff.data.shards import read_index
from cadiff.errors import DataError


def _cfg(**kw):
    base = {"batch_size": 2, "crop_frames": 9, "crop_height": 16, "crop_width": 16}
    return OmegaConf.structured(DataConfig(**{**base, **kw}))


def test_deterministic_batches_resume_exactly_and_ranks_are_disjoint(sim_data_root):
    cfg = _cfg(flip=False, crop_frames=None, crop_height=None, crop_width=None)
    it = pipeline.deterministic_batches(sim_data_root, "train", cfg, rank=0, world_size=2, seed=3)
    batches = [next(it) for _ in range(9)]  # 7 samples per rank, 3 batches per epoch: crosses 2 epochs
    assert batches[0].shape == (2, 1, 17, 32, 32) and batches[0].dtype == torch.float32
    resumed = pipeline.deterministic_batches(sim_data_root, "train", cfg, rank=0, world_size=2, seed=3, start_batch=7)
    assert torch.equal(next(resumed), batches[7]) and torch.equal(next(resumed), batches[8])
    other = pipeline.deterministic_batches(sim_data_root, "train", cfg, rank=1, world_size=2, seed=3)
    rank1 = [next(other) for _ in range(3)]

    def keys(bs):
        return {b.numpy().tobytes() for batch in bs for b in batch}

    epoch0_rank0, epoch0_rank1 = keys(batches[:3]), keys(rank1)
    assert len(epoch0_rank0) == 6 and len(epoch0_rank1) == 6 and not epoch0_rank0 & epoch0_rank1
    # a rank keeps its 7 samples across epochs (6 used per epoch, order reshuffled)
    assert len(keys(batches)) == 7 and not keys(batches) & epoch0_rank1
    assert not all(torch.equal(a, b) for a, b in zip(batches[:3], batches[3:6]))


def test_deterministic_augmentation_is_seeded(sim_data_root):
    cfg = _cfg()
    a = next(pipeline.deterministic_batches(sim_data_root, "train", cfg, 0, 1, seed=0))
    b = next(pipeline.deterministic_batches(sim_data_root, "train", cfg, 0, 1, seed=0))
    c = next(pipeline.deterministic_batches(sim_data_root, "train", cfg, 0, 1, seed=1))
    assert a.shape == (2, 1, 9, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["webdataset", "indexed"])
def test_torch_dataloaders_cover_the_split(sim_data_root, mode):
    cfg = _cfg(crop_frames=None, crop_height=None, crop_width=None, flip=False)
    val = list(pipeline.torch_dataloader(sim_data_root, "val", cfg, mode=mode))
    assert sum(b.shape[0] for b in val) == 5 and val[0].shape[1:] == (1, 17, 32, 32)
    train = list(pipeline.torch_dataloader(sim_data_root, "train", cfg, mode=mode, num_workers=0))
    assert sum(b.shape[0] for b in train) == 14  # 15 clips, drop_last with batch 2
    seen = {x.numpy().tobytes() for b in train for x in b}
    assert len(seen) == 14


def test_val_batch_is_fixed_and_centre_cropped(sim_data_root):
    cfg = _cfg()
    a, b = pipeline.val_batch(sim_data_root, 3, cfg), pipeline.val_batch(sim_data_root, 3, cfg)
    assert a.shape == (3, 1, 9, 16, 16) and torch.equal(a, b)
    full = pipeline.val_batch(sim_data_root, 3, _cfg(crop_frames=None, crop_height=None, crop_width=None))
    assert torch.equal(a, full[:, :, 4:13, 8:24, 8:24])
    assert pipeline.val_batch(sim_data_root, 50, cfg).shape[0] == 5  # only 5 val clips exist


def test_normalized_values_match_index(sim_data_root):
    index = read_index(sim_data_root)
    assert index["normalization"]["kind"] == "anscombe"  # the prepare_data default
    x = torch.cat(list(pipeline.torch_dataloader(sim_data_root, "train", _cfg(crop_frames=None, crop_height=None,
                                                                               crop_width=None), mode="indexed")))
    assert abs(float(x.mean())) < 0.1 and 0.9 < float(x.std()) < 1.1


def test_crop_larger_than_clip_is_an_error(sim_data_root):
    with pytest.raises(DataError, match="larger than the stored clips"):
        pipeline.val_batch(sim_data_root, 1, _cfg(crop_height=64))


def test_corrupt_shard_fail_or_skip(sim_data_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(sim_data_root, root)
    bad = root / "train" / "clips-000001.tar"
    bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"clips-000001.tar.*corrupt_shards=skip"):
        next(pipeline.deterministic_batches(root, "train", _cfg(), 0, 1, seed=0))
    with pytest.raises(DataError, match="clips-000001.tar"):
        list(pipeline.torch_dataloader(root, "train", _cfg(), mode="webdataset"))
    before = len(pipeline.SKIPPED_SHARDS)
    skip = _cfg(corrupt_shards="skip", crop_frames=None, crop_height=None, crop_width=None, flip=False)
    batches = list(pipeline.torch_dataloader(root, "train", skip, mode="indexed"))
    assert sum(b.shape[0] for b in batches) == 10  # 11 clips left in the good shards, drop_last
    assert len(pipeline.SKIPPED_SHARDS) == before + 1 and pipeline.SKIPPED_SHARDS[-1].endswith("clips-000001.tar")
    det = pipeline.deterministic_batches(root, "train", skip, 0, 1, seed=0)
    assert next(det).shape == (2, 1, 17, 32, 32)


def test_latent_deterministic_batches(tmp_path):
    from cadiff.data.shards import write_index, write_shards

    rng = np.random.default_rng(0)
    samples = [(f"z{i}", (rng.standard_normal((4, 3, 4, 4)) * 2 + 5).astype(np.float16), {"source": "s"})
               for i in range(6)]
    infos = write_shards(samples, tmp_path, "train", "latents", clips_per_shard=4)
    write_index(tmp_path, {"kind": "latents", "latent_shape": [4, 3, 4, 4], "dtype": "float16",
                           "splits": {"train": {"shards": infos, "num_clips": 6}}, "sources": {},
                           "channel_mean": [5.0] * 4, "channel_std": [2.0] * 4, "stage1": "x"})
    cfg = OmegaConf.create({"batch_size": 3, "corrupt_shards": "fail"})
    batch = next(pipeline.deterministic_batches(tmp_path, "train", cfg, 0, 1, seed=0, kind="latents"))
    assert batch.shape == (3, 4, 3, 4, 4) and batch.dtype == torch.float32
    assert abs(float(batch.mean())) < 0.5
    with pytest.raises(DataError, match="kind 'latents', expected 'clips'"):
        pipeline.val_batch(tmp_path, 2, cfg)
    assert pipeline.val_batch(tmp_path, 2, cfg, kind="latents").shape == (2, 4, 3, 4, 4)


@pytest.mark.parametrize(("job", "key"), [("train_ae", "data"), ("train_latent", "latents"), ("sweep", "data")])
def test_data_task_cpus_must_be_positive(job, key):
    """``<data>.cpus_per_task`` (CPUs per Ray Data decode task) is checked when the config is composed."""
    from cadiff.config import compose
    from cadiff.errors import ConfigError

    assert compose(job, [f"{key}.cpus_per_task=0.25"])[key].cpus_per_task == 0.25
    with pytest.raises(ConfigError, match=rf"{key}.cpus_per_task.*0.*> 0 \(CPUs per Ray Data task\)"):
        compose(job, [f"{key}.cpus_per_task=0"])
