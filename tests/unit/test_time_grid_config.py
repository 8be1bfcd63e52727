"""The sampling time grid as configuration: one validation rule for model.diffusion.grid and decoder_grid, and the
stage-1 decoder (and jobs/sample.py's decoder settings) decoding on the chosen grid."""

from __future__ import annotations

import pytest
import torch

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.inference.sample import decoder_settings
from cadiff.models.registry import build_model

FLOW_DECODER = ["experiment=ae_tiny", "model.decoder_form=flow", "model.noise_std=0.3"]


def test_grid_keys_are_validated_at_load_with_the_key_named() -> None:
    assert compose("train_ae", ["experiment=ae_tiny"]).model.diffusion.grid == "uniform"  # default unchanged
    assert compose("train_ae", [*FLOW_DECODER, "model.diffusion.grid=rho:2"]).model.diffusion.grid == "rho:2"
    with pytest.raises(ConfigError, match=r"'model.diffusion.grid' = 'rho:-1': expected 'uniform', 'shift:S'"):
        compose("train_ae", ["experiment=ae_tiny", "model.diffusion.grid=rho:-1"])
    with pytest.raises(ConfigError, match=r"'decoder_grid' = 'edm': expected 'uniform', 'shift:S' \(S > 0\)"):
        compose("sample", ["stage2=somewhere", "decoder_grid=edm"])
    assert compose("sample", ["stage2=somewhere", "decoder_grid=shift:0.5"]).decoder_grid == "shift:0.5"


@torch.no_grad()
def test_flow_decoder_decodes_on_its_configured_grid_and_the_sample_override() -> None:
    torch.manual_seed(0)
    uniform = build_model(compose("train_ae", FLOW_DECODER).model).eval()
    torch.nn.init.normal_(uniform.decoder.conv_out.conv.weight, std=0.1)  # a non-trivial UNet velocity
    on_rho = build_model(compose("train_ae", [*FLOW_DECODER, "model.diffusion.grid=rho:2"]).model).eval()
    on_rho.load_state_dict(uniform.state_dict())
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(1))

    def decode(model, grid=None):
        return model.decode(z, "heun", 3, torch.Generator().manual_seed(2), grid=grid)

    assert torch.equal(decode(on_rho), decode(uniform, "rho:2"))
    assert torch.equal(decode(on_rho, "uniform"), decode(uniform))
    assert not torch.equal(decode(on_rho), decode(uniform))
    settings = decoder_settings(on_rho, {"decoder_sampler": None, "decoder_steps": None, "decoder_grid": None})
    assert settings["decoder_grid"] == "rho:2"  # the run's own, recorded in samples.json
    assert decoder_settings(on_rho, {"decoder_sampler": None, "decoder_steps": 2,
                                     "decoder_grid": "shift:0.5"})["decoder_grid"] == "shift:0.5"
    # an export written before the key existed decodes on the uniform grid, as it always did
    old = dict(uniform.model_config, diffusion={k: v for k, v in uniform.model_config["diffusion"].items() if k != "grid"})
    assert build_model(old).objective.default_grid == "uniform"
