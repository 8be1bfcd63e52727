"""Driver-side planning helpers of ``cadiff.train.launch`` that need no Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.train import launch


def test_noise_skip_fills_the_noise_std_of_anscombe_data():
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.noise_skip=true"])
    launch._fill_noise_std(cfg.model, {"kind": "anscombe", "center": 10.0, "scale": 4.0}, Path("data"))
    assert cfg.model.noise_std == pytest.approx(0.25)
    # an explicit value must agree with the data; off (or the regression AE) leaves the config alone
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.noise_skip=true", "model.noise_std=0.5"])
    with pytest.raises(ConfigError, match=r"model.noise_std=0.5 contradicts .*normalization.scale=4.0"):
        launch._fill_noise_std(cfg.model, {"kind": "anscombe", "center": 10.0, "scale": 4.0}, Path("data"))
    for overrides in ([], ["model=regression_ae", "model.noise_skip=true"]):
        cfg = compose("train_ae", ["experiment=ae_tiny", *overrides])
        launch._fill_noise_std(cfg.model, {"kind": "photon", "center": 10.0, "scale": 4.0}, Path("data"))
        assert cfg.model.noise_std is None
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.noise_skip=true"])
    with pytest.raises(ConfigError, match=r"data/index.json has normalization.kind='photon'"):
        launch._fill_noise_std(cfg.model, {"kind": "photon", "center": 10.0, "scale": 4.0}, Path("data"))


def test_noise_skip_auto_follows_the_data_normalization():
    for norm, expected in (("anscombe", 0.5), ("photon", None)):
        cfg = compose("train_ae", ["experiment=ae_tiny"])
        assert cfg.model.noise_skip is None  # the default: on exactly for Anscombe-normalized data
        launch._fill_noise_std(cfg.model, {"kind": norm, "center": 0.0, "scale": 2.0}, Path("data"))
        assert cfg.model.noise_std == expected
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.noise_skip=false"])
    launch._fill_noise_std(cfg.model, {"kind": "anscombe", "center": 0.0, "scale": 2.0}, Path("data"))
    assert cfg.model.noise_std is None
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.diffusion.objective=ddpm", "model.diffusion.sampler=ddim"])
    launch._fill_noise_std(cfg.model, {"kind": "anscombe", "center": 0.0, "scale": 2.0}, Path("data"))
    assert cfg.model.noise_std is None  # auto never turns the flow-only term on for DDPM
