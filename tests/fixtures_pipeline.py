"""Session fixtures for the generative pipeline: a tiny stage-1 run, its latents and a tiny stage-2 run."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadiff.config import compose


def _tiny_single_run(job: str, stage: str, out: Path, *overrides: str) -> Path:
    """A 3-step ``job`` run (strategy=single: no Ray needed) under ``out``; its run folder (with the export)."""
    from cadiff.train.launch import run_training

    cfg = compose(job, [*overrides, f"out_root={out}", "strategy=single", "trainer.num_workers=1",
                        "trainer.max_steps=3", "trainer.log_every=1", "trainer.val_every=3", "trainer.ckpt_every=3"])
    _, path = run_training(cfg, stage)
    return Path(path)


@pytest.fixture(scope="session")
def stage1_run(sim_data_root, tmp_path_factory) -> Path:
    """A 3-step ae_tiny run with its export."""
    return _tiny_single_run("train_ae", "ae", tmp_path_factory.mktemp("stage1"), "experiment=ae_tiny",
                            f"data.root={sim_data_root}", "run_name=s1")


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
    """A 3-step dit_tiny run on those latents with its export."""
    return _tiny_single_run("train_latent", "latent", tmp_path_factory.mktemp("stage2"), "experiment=dit_tiny",
                            f"latents.root={latents_root}", "run_name=d1")
