"""Driver-side planning that needs no Ray cluster: values derived from the data index (``cadiff.train.stage``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadiff.config import compose, to_dict
from cadiff.errors import ConfigError
from cadiff.train.stage import STAGES, DataInfo, derived_noise, get_stage

SOURCES = {"b": {"gain": 4.0, "offset": 100.0, "read_noise": 6.0}, "a": {"gain": 2.0, "offset": 90.0, "read_noise": 1.0}}


def derive(overrides: list[str], norm: str, scale: float, center: float = 10.0, sources=None) -> dict:
    cfg = compose("train_ae", overrides)
    before = to_dict(cfg)
    out = derived_noise(to_dict(cfg.model), {"kind": norm, "center": center, "scale": scale}, Path("data"), sources)
    assert to_dict(cfg) == before, "deriving values from the data must not write into the job config"
    return out


def test_mean_flow_gets_the_noise_model_of_the_data():
    for norm in ("anscombe", "photon"):
        # the first source by id: read noise 1.0 ADU / gain 2.0 = 0.5 photons
        assert derive(["experiment=ae_tiny"], norm, 4.0, sources=SOURCES) == {
            "noise_model": {"kind": norm, "center": 10.0, "scale": 4.0, "read_noise_photons": 0.5}}
    with pytest.raises(ConfigError, match="noise_skip=false leaves the mean_flow decoder"):
        derive(["experiment=ae_tiny", "model.noise_skip=false"], "anscombe", 2.0)
    assert derive(["experiment=ae_tiny", "model.noise_skip=false", "model.noise_std=0.3"], "anscombe", 2.0) == {}


def test_noise_skip_fills_the_noise_std_of_anscombe_data():
    flow = ["experiment=ae_tiny", "model.decoder_form=flow"]
    assert derive([*flow, "model.noise_skip=true"], "anscombe", 4.0) == {"noise_std": pytest.approx(0.25)}
    # an explicit value must agree with the data; off (or the regression AE) derives nothing
    with pytest.raises(ConfigError, match=r"model.noise_std=0.5 contradicts .*normalization.scale=4.0"):
        derive([*flow, "model.noise_skip=true", "model.noise_std=0.5"], "anscombe", 4.0)
    for overrides in (flow, ["experiment=ae_tiny", "model=regression_ae", "model.noise_skip=true"]):
        assert derive(overrides, "photon", 4.0) == {}
    with pytest.raises(ConfigError, match=r"data/index.json has normalization.kind='photon'"):
        derive([*flow, "model.noise_skip=true"], "photon", 4.0)


def test_noise_skip_auto_follows_the_data_normalization():
    assert compose("train_ae", ["experiment=ae_tiny"]).model.noise_skip is None  # on exactly for Anscombe data
    assert derive(["experiment=ae_tiny", "model.decoder_form=flow"], "anscombe", 2.0, 0.0) == {"noise_std": 0.5}
    assert derive(["experiment=ae_tiny", "model.decoder_form=flow"], "photon", 2.0, 0.0) == {}
    assert derive(["experiment=ae_tiny", "model.decoder_form=flow", "model.noise_skip=false"], "anscombe", 2.0) == {}
    # flow-only terms stay off for DDPM
    assert derive(["experiment=ae_tiny", "model.diffusion.objective=ddpm", "model.diffusion.sampler=ddim"],
                  "anscombe", 2.0) == {}


def test_stage_resolve_returns_data_info_and_model_config_without_touching_cfg(sim_data_root):
    cfg = compose("train_ae", ["experiment=ae_tiny", f"data.root={sim_data_root}"])
    before = to_dict(cfg)
    info, model = get_stage("ae").resolve(cfg)
    assert to_dict(cfg) == before
    assert info.sample_shape == (1, 17, 32, 32) and info.num_train_clips == 15
    assert model["noise_model"]["kind"] == "anscombe" and model["noise_model"]["scale"] == info.normalization["scale"]
    assert DataInfo.from_dict(info.to_dict()) == info
    assert sorted(STAGES) == ["ae", "latent"] and STAGES["latent"].data_key == "latents"
    with pytest.raises(ConfigError, match="stage 'vae'"):
        get_stage("vae")
