"""Causality of the stage-1 models, bitwise in fp32 (DESIGN.md contract), and the T = 1 + k*s_t shape rules.

Perturb one input frame and compare outputs frame by frame with ``torch.equal``: everything that may not see
the perturbed frame must be bit-identical, everything that may see it must change.
"""

from __future__ import annotations

import math

import pytest
import torch

from cadiff.config import compose
from cadiff.errors import ConfigError, ModelError
from cadiff.models.registry import build_model

S_T = 4  # ae_tiny: temporal_downsample 4, spatial_downsample 8
FRAMES = 17


MEAN_FLOW = ("model.noise_model.kind=anscombe", "model.noise_model.center=4.0", "model.noise_model.scale=0.5",
             "model.noise_model.read_noise_photons=0.2")  # the default decoder form, as the trainer fills it in


def _model(kind: str = "diffae", attention: bool = False, extra: tuple[str, ...] = MEAN_FLOW):
    overrides = ["experiment=ae_tiny", f"model.dec_attention={attention}", *extra]
    if kind == "regression":
        overrides.append("model=regression_ae")
    torch.manual_seed(0)
    model = build_model(compose("train_ae", overrides).model).eval()
    # output convs are zero-initialized; give them weights so every dependency shows in the output
    for net in (model.decoder, getattr(model, "mean_decoder", None)):
        if net is not None:
            torch.nn.init.normal_(net.conv_out.conv.weight, std=0.1)
    return model


def _perturbed(x: torch.Tensor, frame: int) -> torch.Tensor:
    y = x.clone()
    y[:, :, frame] += torch.randn(y[:, :, frame].shape, generator=torch.Generator().manual_seed(frame + 100))
    return y


def _changed(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    return [not torch.equal(a[:, :, i], b[:, :, i]) for i in range(a.shape[2])]


@pytest.fixture(scope="module")
def diffae():
    return _model()


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return torch.randn(1, 1, FRAMES, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_encoder_latent_frame_i_sees_only_frames_up_to_s_t_times_i(diffae, clip) -> None:
    z = diffae.encode(clip)
    assert z.shape == (1, 4, 5, 4, 4)
    for j in (0, 1, 3, 4, 5, 9, 16):
        changed = _changed(z, diffae.encode(_perturbed(clip, j)))
        expected = [S_T * i >= j for i in range(z.shape[2])]
        assert changed == expected, f"perturbing frame {j}: latent frames changed {changed}, expected {expected}"


NOISE_SKIP = ("model.decoder_form=flow", "model.noise_std=0.25", "model.noise_highpass=false")
NOISE_SKIP_HP = ("model.decoder_form=flow", "model.noise_std=0.25", "model.noise_highpass=true")
RESIDUAL = (*MEAN_FLOW, "model.residual_unet=true")
PLAIN_FLOW = ("model.decoder_form=flow",)
UPSAMPLER = (*MEAN_FLOW, "model.mean_head=upsampler")
UNET_HEAD = (*MEAN_FLOW, "model.mean_head=unet")  # the mean head's other network (the default is the upsampler)


@pytest.mark.parametrize("attention, extra", [(False, MEAN_FLOW), (False, UNET_HEAD), (True, RESIDUAL), (False, RESIDUAL),
                                              (False, UPSAMPLER), (True, UPSAMPLER),
                                              (False, PLAIN_FLOW), (False, NOISE_SKIP), (False, NOISE_SKIP_HP)])
@torch.no_grad()
def test_decoder_velocity_is_causal_in_x_t_and_chunk_causal_in_z(attention: bool, extra: tuple[str, ...]) -> None:
    model = _model(attention=attention, extra=extra)
    g = torch.Generator().manual_seed(1)
    x_t, z, t = torch.randn(1, 1, FRAMES, 32, 32, generator=g), torch.randn(1, 4, 5, 4, 4, generator=g), torch.tensor([0.3])
    v = model.velocity(x_t, t, z)
    for j in (0, 2, 8, 13, 16):
        changed = _changed(v, model.velocity(_perturbed(x_t, j), t, z))
        # without a residual UNet the velocity is analytic and per pixel: x_t frame j moves output frame j only
        expected = [m == j if model.decoder is None else m >= j for m in range(FRAMES)]
        assert changed == expected, f"x_t frame {j}: changed {changed}"
    for i in range(5):
        changed = _changed(v, model.velocity(x_t, t, _perturbed(z, i)))
        # output frame m reads latent frame ceil(m / s_t)
        expected = [math.ceil(m / S_T) >= i for m in range(FRAMES)]
        assert changed == expected, f"z frame {i}: changed {changed}, expected {expected}"


@pytest.mark.parametrize("kind, extra", [("diffae", MEAN_FLOW), ("diffae", UNET_HEAD), ("diffae", RESIDUAL), ("regression", ()),
                                         ("diffae", NOISE_SKIP_HP), ("diffae", UPSAMPLER),
                                         ("regression", ("model.mean_head=unet",))])
@torch.no_grad()
def test_full_autoencoder_is_causal_at_chunk_granularity(kind: str, extra: tuple[str, ...], clip) -> None:
    model = _model(kind, extra=extra)

    def recon(x: torch.Tensor) -> torch.Tensor:
        return model.reconstruct(x, sampler="euler", num_steps=2, generator=torch.Generator().manual_seed(5))

    base = recon(clip)
    assert torch.equal(base, recon(clip)), "reconstruction with a fixed generator must be reproducible"
    for j in (1, 5, 9, 13):  # chunk starts: every earlier frame must be bit-identical, every later one changes
        changed = _changed(base, recon(_perturbed(clip, j)))
        assert changed == [m >= j for m in range(FRAMES)], f"frame {j}: changed {changed}"
    for j in (3, 16):  # inside a chunk: frames of earlier chunks are untouched
        changed = _changed(base, recon(_perturbed(clip, j)))
        chunk_start = S_T * (math.ceil(j / S_T) - 1) + 1
        assert changed == [m >= chunk_start for m in range(FRAMES)], f"frame {j}: changed {changed}"


def test_clip_and_latent_shape_contracts(diffae) -> None:
    for k in (0, 1, 2, 4, 16):
        clip_shape = (1, 1 + k * S_T, 32, 64)
        latent = diffae.latent_shape(clip_shape)
        assert latent == (4, 1 + k, 4, 8)
        assert diffae.clip_shape_for(latent) == clip_shape
    with torch.no_grad():
        assert diffae.encode(torch.zeros(1, 1, 9, 16, 24)).shape == (1, 4, 3, 2, 3)
        assert diffae.decode(torch.zeros(1, 4, 3, 2, 3), num_steps=1).shape == (1, 1, 9, 16, 24)


@pytest.mark.parametrize("frames", [16, 18, 20])
def test_wrong_frame_count_raises_clear_model_error(diffae, frames: int) -> None:
    with pytest.raises(ModelError, match=r"T = \d+ frames.*1 \+ k\*4.*temporal_downsample=4"):
        diffae.encode(torch.zeros(1, 1, frames, 32, 32))
    with pytest.raises(ModelError, match="1 \\+ k\\*4"):
        diffae.training_loss(torch.zeros(1, 1, frames, 32, 32))
    with pytest.raises(ModelError, match="1 \\+ k\\*4"):
        diffae.latent_shape((1, frames, 32, 32))


def test_other_bad_shapes_raise_model_error(diffae) -> None:
    with pytest.raises(ModelError, match="multiples of spatial_downsample=8"):
        diffae.encode(torch.zeros(1, 1, 17, 30, 32))
    with pytest.raises(ModelError, match="channel"):
        diffae.encode(torch.zeros(1, 2, 17, 32, 32))
    with pytest.raises(ModelError, match="z_channels=4"):
        diffae.decode(torch.zeros(1, 3, 5, 4, 4))
    with pytest.raises(ModelError, match=r"\[B, C, T, H, W\]"):
        diffae.encode(torch.zeros(1, 17, 32, 32))


@pytest.mark.parametrize("overrides", [
    ["model.latent_reg=none", *MEAN_FLOW],
    ["model.diffusion.objective=ddpm", "model.diffusion.sampler=ddim"],
    ["model=regression_ae", "model.regression_loss=l1"],
    ["model.dec_attention=true", "model.recompute_elementwise=false", *MEAN_FLOW],
    ["model.decoder_form=flow", "model.noise_std=0.3", "model.noise_highpass=true"],
    ["model.residual_unet=true", "model.noise_std=0.3"],
    ["model.noise_model.kind=photon", "model.noise_model.center=20", "model.noise_model.scale=5"],
    ["model.mean_head=upsampler", "model.dec_attention=true", *MEAN_FLOW],
    ["model.mean_head=unet", "model.dec_attention=true", *MEAN_FLOW],
    ["model=regression_ae", "model.mean_head=unet"],
])
def test_model_variants_train_decode_and_rebuild(overrides: list[str]) -> None:
    torch.manual_seed(0)
    model = build_model(compose("train_ae", ["experiment=ae_tiny", *overrides]).model)
    x = torch.randn(2, 1, 9, 16, 16)
    loss, metrics = model.training_loss(x, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["loss"]) == pytest.approx(float(loss.detach()))
    # detached 0-d tensors: the loop reads them on log steps only (no host sync per step)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # leave the zero-initialized output conv
    model.zero_grad()
    model.training_loss(x, torch.Generator().manual_seed(0))[0].backward()
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0, "the encoder must receive gradient"
    if "model.latent_reg=none" in overrides:
        assert float(metrics["kl"]) == 0.0
    z = model.encode(x)
    assert z.shape == (2, 4, 3, 2, 2)
    assert model.decode(z, num_steps=2, generator=torch.Generator().manual_seed(1)).shape == x.shape
    assert model.flops_per_sample((1, 9, 16, 16)) > 0 and len(model.shard_units()) > 0
    twin = build_model(model.model_config)
    assert type(twin) is type(model)
    twin.load_state_dict(model.state_dict())  # same architecture from the stored plain config


@pytest.mark.parametrize("highpass", [False, True])
@torch.no_grad()
def test_noise_skip_adds_the_gaussian_velocity_to_the_network(highpass: bool) -> None:
    """At init (zero output conv) the velocity is exactly the analytic term; later the UNet adds to it."""
    from cadiff.diffusion.flow import gaussian_velocity_coeff

    std = 0.25
    torch.manual_seed(0)
    model = build_model(compose("train_ae", ["experiment=ae_tiny", "model.decoder_form=flow", f"model.noise_std={std}",
                                             f"model.noise_highpass={highpass}"]).model).eval()
    g = torch.Generator().manual_seed(2)
    x_t, z = torch.randn(2, 1, 9, 16, 16, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    t = torch.tensor([0.1, 0.7])
    k_noise = gaussian_velocity_coeff(t, std).view(2, 1, 1, 1, 1)
    if highpass:
        low = torch.nn.functional.avg_pool2d(x_t[:, 0].reshape(18, 1, 16, 16), 3, 1, 1, count_include_pad=False)
        low = low.reshape(2, 1, 9, 16, 16)
        expected = k_noise * (x_t - low) + gaussian_velocity_coeff(t, 1.0).view(2, 1, 1, 1, 1) * low
    else:
        expected = k_noise * x_t
    assert torch.allclose(model.velocity(x_t, t, z), expected, atol=1e-6)
    torch.nn.init.normal_(model.decoder.conv_out.conv.weight, std=0.1)
    assert torch.allclose(model.velocity(x_t, t, z), model.decoder(x_t, t, z) + expected, atol=1e-5)
    # scalar time broadcasts like a batch of equal times
    assert torch.allclose(model.velocity(x_t, torch.tensor(0.7), z), model.velocity(x_t, torch.full((2,), 0.7), z))


def test_noise_skip_needs_the_flow_objective() -> None:
    with pytest.raises(ConfigError, match="noise"):
        compose("train_ae", ["experiment=ae_tiny", "model.noise_std=0.2", "model.diffusion.objective=ddpm",
                             "model.diffusion.sampler=ddim"])
    with pytest.raises(ConfigError, match="decoder_form='mean_flow'.*objective=flow"):
        compose("train_ae", ["experiment=ae_tiny", "model.decoder_form=mean_flow", "model.diffusion.objective=ddpm",
                             "model.diffusion.sampler=ddim"])
    with pytest.raises(ConfigError, match="decoder_form"):
        compose("train_ae", ["experiment=ae_tiny", "model.decoder_form=mean"])
    with pytest.raises(ModelError, match="needs the pixel noise level"):
        build_model(compose("train_ae", ["experiment=ae_tiny"]).model)
    with pytest.raises(ConfigError, match="noise_std"):
        compose("train_ae", ["experiment=ae_tiny", "model.noise_std=-1"])


@pytest.mark.parametrize("s_t, frames", [(1, 5), (2, 9), (4, 17), (8, 17)])
@torch.no_grad()
def test_upsampling_mean_head_runs_coarse_levels_at_the_latent_rate_and_stays_chunk_causal(s_t: int, frames: int) -> None:
    """Time is doubled at the levels nearest full resolution; any s_t (fewer, equal or more doublings than levels)."""
    overrides = ["experiment=ae_tiny", "model.mean_head=upsampler", f"model.temporal_downsample={s_t}", *MEAN_FLOW]
    torch.manual_seed(0)
    model = build_model(compose("train_ae", overrides).model).eval()
    head = model.mean_decoder
    torch.nn.init.normal_(head.conv_out.conv.weight, std=0.1)
    assert [head.frame_factor(level) for level in range(3)] == [s_t, max(1, s_t // 2), max(1, s_t // 4)]
    z = torch.randn(1, 4, 1 + (frames - 1) // s_t, 2, 2, generator=torch.Generator().manual_seed(3))
    mu = model.mean(z)
    assert mu.shape == (1, 1, frames, 16, 16)
    for i in range(z.shape[2]):
        changed = _changed(mu, model.mean(_perturbed(z, i)))
        assert changed == [math.ceil(m / s_t) >= i for m in range(frames)], f"z frame {i}: changed {changed}"


def test_upsampling_mean_head_refuses_levels_coarser_than_the_latent_and_the_flow_form() -> None:
    with pytest.raises(ConfigError, match=r"model.dec_channel_mult.*mean_head=upsampler"):
        compose("train_ae", ["experiment=ae_tiny", "model.mean_head=upsampler", "model.spatial_downsample=2",
                             "model.temporal_downsample=2"])
    for form in (["model.decoder_form=flow"], ["model.diffusion.objective=ddpm"]):
        with pytest.raises(ConfigError, match="mean_head='upsampler'.*decoder_form='flow' does not have"):
            compose("train_ae", ["experiment=ae_tiny", "model.mean_head=upsampler", *form])
    compose("train_ae", ["experiment=ae_tiny", "model=regression_ae", "model.mean_head=upsampler",
                         "model.diffusion.objective=ddpm"])  # the regression AE has no flow: its head is the decoder
    # the default (null) is the upsampler where there is a mean head: the same level rule, naming the way out
    with pytest.raises(ConfigError, match=r"mean_head=upsampler \(the default\).*or set model.mean_head=unet"):
        compose("train_ae", ["experiment=ae_tiny", "model.spatial_downsample=2", "model.temporal_downsample=2"])
    compose("train_ae", ["experiment=ae_tiny", "model.spatial_downsample=2", "model.temporal_downsample=2",
                         "model.mean_head=unet"])


@pytest.mark.parametrize("overrides, head, network", [
    ([], "upsampler", "LatentUpsampler"),
    (["model.mean_head=unet"], "unet", "UNet3D"),
    (["model=regression_ae"], "upsampler", "LatentUpsampler"),
    (["model.decoder_form=flow"], None, None),
    (["model.diffusion.objective=ddpm", "model.noise_std=null", "model.noise_skip=false"], None, None),
])
def test_the_default_mean_head_is_the_upsampler_and_exports_name_it(overrides, head, network) -> None:
    """model.mean_head=null resolves to the upsampler where there is a mean head (None for the flow form, which has
    none); the resolved model config names it, so an export rebuilds it whatever a later default is."""
    model = build_model(compose("train_ae", ["experiment=ae_tiny", "model.noise_std=0.3", *overrides]).model)
    assert model.model_config["mean_head"] == head
    held = getattr(model, "mean_decoder", None) if model.model_config["kind"] == "diffae" else model.decoder
    assert (type(held).__name__ if held is not None else None) == network


def _blocks_per_level(net) -> list[int]:
    """Residual blocks per level: the encoder's and the upsampler's levels, the UNet's down path."""
    return [len(level) for level in (net.down if hasattr(net, "down") else net.levels)]


@pytest.mark.parametrize("overrides, dec_blocks, head_blocks", [
    ([], 0, [1, 1, 1]),  # the default: the upsampler is the only decoder network, one block per level
    (["model=regression_ae"], 0, [1, 1, 1]),
    (["model.dec_num_res_blocks=1"], 1, [2, 2, 2]),
    (["model.mean_head=unet"], 1, [1, 1, 1]),  # a UNet head's down path: dec_num_res_blocks per level
    (["model.residual_unet=true"], 1, [2, 2, 2]),  # a decoder UNet beside the head keeps the depth it had
    (["model.decoder_form=flow"], 1, None),
])
def test_decoder_depth_defaults_to_one_block_per_level_for_a_lone_upsampler(overrides, dec_blocks, head_blocks) -> None:
    """model.dec_num_res_blocks=null: 0 (one block per upsampler level) where the upsampler is the model's only
    decoder network, else 1; the resolved value is what the model config (and so an export) records."""
    model = build_model(compose("train_ae", ["experiment=ae_tiny", "model.noise_std=0.3", *overrides]).model)
    assert model.model_config["dec_num_res_blocks"] == dec_blocks
    head = model.decoder if model.model_config["kind"] == "regression" else getattr(model, "mean_decoder", None)
    assert (_blocks_per_level(head) if head is not None else None) == head_blocks
    if model.model_config["kind"] == "diffae" and model.decoder is not None:  # the decoder UNet's down path
        assert _blocks_per_level(model.decoder)[0] == dec_blocks


def test_the_default_encoder_has_constant_width_and_refuses_a_width_it_cannot_build() -> None:
    """num_res_blocks=0 (the default): strided convs and a mid block at base_channels; a channel_mult that asks for
    other widths is refused (only residual blocks change the width), a widening encoder needs blocks."""
    model = build_model(compose("train_ae", ["model.noise_std=0.3"]).model)
    enc = model.encoder
    assert model.model_config["num_res_blocks"] == 0 and _blocks_per_level(enc) == [0, 0, 0, 0]
    widths = {m.out_channels for m in enc.modules() if isinstance(m, torch.nn.Conv3d)} - {2 * model.z_channels}
    assert widths == {model.model_config["base_channels"]}
    with pytest.raises(ConfigError, match=r"model.channel_mult.*\[1, 2, 4, 4\].*num_res_blocks=0"):
        compose("train_ae", ["model.channel_mult=[1,2,4,4]"])
    with pytest.raises(ConfigError, match=r"model.num_res_blocks.*-1.*>= 0"):
        compose("train_ae", ["model.num_res_blocks=-1"])
    wide = build_model(compose("train_ae", ["model.noise_std=0.3", "model.num_res_blocks=1",
                                            "model.channel_mult=[1,2,4,4]"]).model).encoder
    assert _blocks_per_level(wide) == [1, 1, 1, 1] and wide.mid.conv1.conv.out_channels == 128
