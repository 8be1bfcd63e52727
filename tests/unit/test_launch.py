"""Driver-side planning helpers of ``cadiff.train.launch`` that need no Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.train import launch

SOURCES = {"b": {"gain": 4.0, "offset": 100.0, "read_noise": 6.0}, "a": {"gain": 2.0, "offset": 90.0, "read_noise": 1.0}}


def test_mean_flow_gets_the_noise_model_of_the_data():
    for norm in ("anscombe", "photon"):
        cfg = compose("train_ae", ["experiment=ae_tiny"])
        launch.fill_noise_model(cfg.model, {"kind": norm, "center": 10.0, "scale": 4.0}, Path("data"), SOURCES)
        nm = cfg.model.noise_model
        # the first source by id: read noise 1.0 ADU / gain 2.0 = 0.5 photons
        assert (nm.kind, nm.center, nm.scale, nm.read_noise_photons) == (norm, 10.0, 4.0, 0.5)
        assert cfg.model.noise_std is None
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.noise_skip=false"])
    with pytest.raises(ConfigError, match="noise_skip=false leaves the mean_flow decoder"):
        launch.fill_noise_model(cfg.model, {"kind": "anscombe", "center": 0.0, "scale": 2.0}, Path("data"))
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.noise_skip=false", "model.noise_std=0.3"])
    launch.fill_noise_model(cfg.model, {"kind": "anscombe", "center": 0.0, "scale": 2.0}, Path("data"))
    assert cfg.model.noise_model.kind == "none" and cfg.model.noise_std == 0.3


def test_noise_skip_fills_the_noise_std_of_anscombe_data():
    flow = ["experiment=ae_tiny", "model.decoder_form=flow"]
    cfg = compose("train_ae", [*flow, "model.noise_skip=true"])
    launch.fill_noise_model(cfg.model, {"kind": "anscombe", "center": 10.0, "scale": 4.0}, Path("data"))
    assert cfg.model.noise_std == pytest.approx(0.25)
    # an explicit value must agree with the data; off (or the regression AE) leaves the config alone
    cfg = compose("train_ae", [*flow, "model.noise_skip=true", "model.noise_std=0.5"])
    with pytest.raises(ConfigError, match=r"model.noise_std=0.5 contradicts .*normalization.scale=4.0"):
        launch.fill_noise_model(cfg.model, {"kind": "anscombe", "center": 10.0, "scale": 4.0}, Path("data"))
    for overrides in (flow, ["experiment=ae_tiny", "model=regression_ae", "model.noise_skip=true"]):
        cfg = compose("train_ae", overrides)
        launch.fill_noise_model(cfg.model, {"kind": "photon", "center": 10.0, "scale": 4.0}, Path("data"))
        assert cfg.model.noise_std is None and cfg.model.noise_model.kind == "none"
    cfg = compose("train_ae", [*flow, "model.noise_skip=true"])
    with pytest.raises(ConfigError, match=r"data/index.json has normalization.kind='photon'"):
        launch.fill_noise_model(cfg.model, {"kind": "photon", "center": 10.0, "scale": 4.0}, Path("data"))


def test_noise_skip_auto_follows_the_data_normalization():
    for norm, expected in (("anscombe", 0.5), ("photon", None)):
        cfg = compose("train_ae", ["experiment=ae_tiny", "model.decoder_form=flow"])
        assert cfg.model.noise_skip is None  # the default: on exactly for Anscombe-normalized data
        launch.fill_noise_model(cfg.model, {"kind": norm, "center": 0.0, "scale": 2.0}, Path("data"))
        assert cfg.model.noise_std == expected
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.decoder_form=flow", "model.noise_skip=false"])
    launch.fill_noise_model(cfg.model, {"kind": "anscombe", "center": 0.0, "scale": 2.0}, Path("data"))
    assert cfg.model.noise_std is None
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.diffusion.objective=ddpm", "model.diffusion.sampler=ddim"])
    launch.fill_noise_model(cfg.model, {"kind": "anscombe", "center": 0.0, "scale": 2.0}, Path("data"))
    assert cfg.model.noise_std is None and cfg.model.noise_model.kind == "none"  # flow-only terms stay off for DDPM


