"""Conditioned stage 2 end to end: ROI maps and flux through encode_latents, a few DiT steps, a masked sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cadiff.config import compose
from cadiff.data.conditioning import decode_mask
from cadiff.data.shards import iter_shard, read_index
from cadiff.errors import DataError
from cadiff.inference.sample import run_sample
from cadiff.train.launch import run_training

pytestmark = pytest.mark.ray


def test_conditioned_dit_trains_and_samples_with_a_mask(latents_root, tmp_path):
    index = read_index(latents_root)
    assert index["conditioning"] == ["roi_mask", "flux"]
    shard = latents_root / index["splits"]["train"]["shards"][0]["path"]
    _key, _z, meta = next(iter_shard(shard))
    assert decode_mask(meta["roi_mask"]).shape == (32, 32) and meta["flux"] > 0
    fluxes = [m["flux"] for s in index["splits"]["train"]["shards"] for _k, _z, m in iter_shard(latents_root / s["path"])]
    assert index["flux_median"] == pytest.approx(float(np.median(fluxes)))  # what a mask sample is held at

    cfg = compose("train_latent", ["experiment=dit_tiny", f"latents.root={latents_root}", f"out_root={tmp_path}",
                                   "run_name=c1", "strategy=single", "trainer.num_workers=1", "trainer.max_steps=3",
                                   "trainer.log_every=1", "trainer.val_every=3", "trainer.ckpt_every=3",
                                   "model.cond_mask=true", "model.cond_flux=true", "model.cond_dropout=0.2"])
    _, run = run_training(cfg, "latent")
    losses = [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(np.isfinite(losses))

    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    np.save(tmp_path / "rois.npy", mask)
    out = tmp_path / "masked"
    run_sample(compose("sample", [f"stage2={run}", "num_samples=2", "batch_size=2", f"out={out}", "latent_steps=2",
                                  "decoder_steps=2", f"mask={tmp_path / 'rois.npy'}", "flux=20", "guidance_scale=2"]))
    record = json.loads((out / "samples.json").read_text())
    assert record["mask"] == str(tmp_path / "rois.npy") and record["flux"] == 20 and record["guidance_scale"] == 2
    assert record["guided"] == ["roi_mask"] and record["flux_held"] == 20  # the mask guided at the requested flux
    assert tifffile.imread(out / "sample_001.tif").shape == (17, 32, 32)
    # a mask alone is guided at the training latents' median flux, recorded with the samples
    run_sample(compose("sample", [f"stage2={run}", "num_samples=1", f"out={tmp_path / 'held'}", "latent_steps=2",
                                  "decoder_steps=2", f"mask={tmp_path / 'rois.npy'}", "guidance_scale=2"]))
    held = json.loads((tmp_path / "held" / "samples.json").read_text())
    assert held["flux"] is None and held["guided"] == ["roi_mask"]
    assert held["flux_held"] == pytest.approx(index["flux_median"])

    np.save(tmp_path / "small.npy", mask[:16, :16])
    with pytest.raises(DataError, match=r"small.npy: shape \(16, 16\), expected .*\(32, 32\)"):
        run_sample(compose("sample", [f"stage2={run}", f"out={tmp_path / 'bad'}", f"mask={tmp_path / 'small.npy'}"]))
    assert not (tmp_path / "bad").exists()
