"""Session fixtures for the generative pipeline: a tiny stage-1 run, its latents and a tiny stage-2 run."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadiff.config import compose


@pytest.fixture(scope="session")
def stage1_run(sim_data_root, tmp_path_factory) -> Path:
    """A 3-step ae_tiny run (strategy=single: no Ray needed) with its export."""
    from cadiff.train.launch import run_training

    out = tmp_path_factory.mktemp("stage1")
    cfg = compose("train_ae", ["experiment=ae_tiny", f"data.root={sim_data_root}", f"out_root={out}", "run_name=s1",
                               "strategy=single", "trainer.num_workers=1", "trainer.max_steps=3",
                               "trainer.log_every=1", "trainer.val_every=3", "trainer.ckpt_every=3"])
    _, path = run_training(cfg, "ae")
    return Path(path)


@pytest.fixture(scope="session")
def latents_root(ray_cluster, stage1_run, sim_data_root, tmp_path_factory) -> Path:
    from cadiff.inference.encode import encode_latents

    out = tmp_path_factory.mktemp("latents") / "lat"
    cfg = compose("encode_latents", [f"stage1={stage1_run}", f"data.root={sim_data_root}", f"out={out}", "batch_size=4",
                                     "cpus_per_actor=0.5"])
    encode_latents(cfg)
    return out


@pytest.fixture(scope="session")
def stage2_run(latents_root, tmp_path_factory) -> Path:
    from cadiff.train.launch import run_training

    out = tmp_path_factory.mktemp("stage2")
    cfg = compose("train_latent", ["experiment=dit_tiny", f"latents.root={latents_root}", f"out_root={out}", "run_name=d1",
                                   "strategy=single", "trainer.num_workers=1", "trainer.max_steps=3",
                                   "trainer.log_every=1", "trainer.val_every=3", "trainer.ckpt_every=3"])
    _, path = run_training(cfg, "latent")
    return Path(path)
