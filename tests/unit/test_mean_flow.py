"""The mean-flow stage-1 decoder: exact analytic noise around the mean head, exact integration, telemetry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadiff.config import compose
from cadiff.data.anscombe import anscombe, anscombe_moments, inverse_anscombe
from cadiff.diffusion import flow
from cadiff.errors import ConfigError, ModelError
from cadiff.models.autoencoder import PixelNoise
from cadiff.models.registry import build_model

NOISE = ["model.noise_model.kind=anscombe", "model.noise_model.center=6.0", "model.noise_model.scale=2.0",
         "model.noise_model.read_noise_photons=0.5"]


def _model(*extra: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(compose("train_ae", ["experiment=ae_tiny", *NOISE, *extra]).model).eval()


def _randomize(net: torch.nn.Module, std: float = 0.05) -> None:
    torch.nn.init.normal_(net.conv_out.conv.weight, std=std)


def test_anscombe_moments_match_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    for level, read_noise in ((0.1, 0.05), (2.0, 0.5), (40.0, 1.0)):
        draws = anscombe(rng.poisson(level, 400_000) + rng.normal(0, read_noise, 400_000), read_noise)
        mean, std = anscombe_moments(np.array([level]), read_noise)
        assert mean[0] == pytest.approx(draws.mean(), abs=4e-3)
        assert std[0] == pytest.approx(draws.std(), rel=1e-2)
    _, std = anscombe_moments(np.array([0.1, 1.0, 100.0]), 0.02)
    assert std[0] < 0.5 < std[1] < 1.0 and std[2] == pytest.approx(1.0, abs=1e-3)  # dark pixels are quieter


@pytest.mark.parametrize("read_noise", [0.02, 0.5])
def test_anscombe_pixel_noise_matches_the_photon_mean_and_variance(read_noise: float) -> None:
    """center + std * n, mapped back to photons, has the Poisson-Gaussian mean lambda and variance lambda + r^2."""
    noise = PixelNoise("anscombe", center=6.0, scale=2.0, read_noise_photons=read_noise)
    levels = np.array([0.1, 0.5, 3.0, 40.0, 500.0])
    expected, _ = anscombe_moments(levels, read_noise)  # what a mean head trained in Anscombe units predicts
    center, std = noise(torch.tensor((expected - 6.0) / 2.0, dtype=torch.float32))
    draws = (center.double()[:, None] * 2.0 + 6.0) + std.double()[:, None] * 2.0 * torch.randn(
        len(levels), 400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    photons = inverse_anscombe(draws.numpy(), read_noise)
    np.testing.assert_allclose(photons.mean(1), levels, rtol=2e-2, atol=3e-3)
    np.testing.assert_allclose(photons.var(1), levels + read_noise**2, rtol=3e-2, atol=3e-3)
    assert float(std[-1]) == pytest.approx(0.5, rel=1e-2)  # bright: unit std in Anscombe units (/ scale 2)


def test_photon_and_constant_pixel_noise() -> None:
    photon = PixelNoise("photon", center=10.0, scale=5.0, read_noise_photons=2.0)
    center, std = photon(torch.tensor([2.0]))
    assert float(center) == 2.0 and float(std) == pytest.approx(np.sqrt(20.0 + 4.0) / 5.0)
    center, std = PixelNoise("constant", constant_std=0.3)(torch.zeros(1))
    assert float(center) == 0.0 and float(std) == pytest.approx(0.3)


@torch.no_grad()
def test_without_residual_decoding_is_the_mean_plus_exact_gaussian_noise() -> None:
    model = _model("model.residual_unet=false")
    assert model.decoder is None  # the default: no residual network
    _randomize(model.mean_decoder)
    z = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    mu = model.mean(z)
    center, sigma = model.pixel_noise(mu)
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    for steps in (1, 3, 10):  # the analytic part is integrated exactly: no dependence on the step count
        x = model.decode(z, num_steps=steps, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(x, center + sigma * noise, atol=1e-5)
    assert model.last_nfe == 0
    assert torch.equal(model.denoise(z), mu)


@torch.no_grad()
def test_decoding_in_w_coordinates_solves_the_velocity_ode() -> None:
    """decode() integrates dw/dt = UNet / s(t); a fine x-space solve of the full velocity must agree."""
    model = _model("model.residual_unet=true")
    _randomize(model.mean_decoder)
    _randomize(model.decoder, std=0.02)
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    fast = model.decode(z, sampler="heun", num_steps=40, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(fast.shape, generator=torch.Generator().manual_seed(4))
    # x-space solve on a grid that avoids t = 0 exactly (k(t) is stiff there for small sigma), then the exact tail
    fine, _ = flow.samplers.sample_flow(model._velocity_fn(z), noise, "heun", 400)
    assert float((fast - fine).abs().max()) < 2e-2 * float(fine.abs().max())
    assert model.last_nfe == 80


@torch.no_grad()
def test_velocity_at_init_is_the_exact_conditional_velocity() -> None:
    model = _model("model.residual_unet=true")
    _randomize(model.mean_decoder)
    g = torch.Generator().manual_seed(2)
    x_t, z, t = torch.randn(2, 1, 9, 16, 16, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g), torch.tensor([0.2, 0.8])
    center, sigma = model.pixel_noise(model.mean(z))
    tb = t.view(2, 1, 1, 1, 1)
    expected = flow.gaussian_velocity_coeff(tb, sigma) * (x_t - (1 - tb) * center) - center
    assert torch.allclose(model.velocity(x_t, t, z), expected, atol=1e-5)


def test_validation_losses_report_latent_use() -> None:
    model = _model()
    x = torch.randn(3, 1, 9, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.validation_losses(x, torch.Generator().manual_seed(1))
    assert {"loss_z", "loss_shuffled_z", "latent_use", "loss_z_t10", "loss_shuffled_z_t90"} <= set(out)
    assert float(out["latent_use"]) == pytest.approx(1.0)  # at init the mean head is zero: z cannot matter
    with torch.no_grad():
        single = model.validation_losses(x[:1])
    assert "latent_use" not in single  # one clip has no other clip to swap latents with


STARVED = ["model.noise_model.kind=anscombe", "model.noise_model.center=1.4", "model.noise_model.scale=0.4",
           "model.noise_model.read_noise_photons=0.02"]  # a typical level of ~0.2 photons, as raw two-photon data


def _starved(*extra: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(compose("train_ae", ["experiment=ae_tiny", *STARVED, *extra]).model).eval()


def test_noise_draw_auto_picks_counts_for_photon_starved_data() -> None:
    assert _model().noise_draw == "gaussian"  # typical level ~8 photons
    assert _starved().noise_draw == "poisson"
    assert _starved("model.noise_draw=gaussian").noise_draw == "gaussian"
    # the FLOP count rebuilds the model on the meta device: the noise model must not need real tensors there
    assert _starved().flops_per_sample((1, 9, 16, 16)) == _model().flops_per_sample((1, 9, 16, 16)) > 0
    with pytest.raises(ConfigError, match="noise_draw='poisson'.*residual_unet=false"):
        compose("train_ae", ["experiment=ae_tiny", *STARVED, "model.noise_draw=poisson", "model.residual_unet=true"])
    with pytest.raises(ModelError, match="no photon level"):
        build_model(compose("train_ae", ["experiment=ae_tiny", "model.noise_std=0.3", "model.noise_draw=poisson"]).model)


@torch.no_grad()
def test_poisson_draw_has_the_counts_statistics() -> None:
    model = _starved()
    noise = model.pixel_noise
    levels = torch.tensor([0.05, 0.3, 2.0])
    expected, _ = anscombe_moments(levels.numpy().astype(np.float64), 0.02)
    mu = torch.tensor((expected - 1.4) / 0.4, dtype=torch.float32)
    assert torch.allclose(noise.photons(mu), levels, rtol=1e-2)  # the unbiased inverse of the mean head's estimate
    x = noise.draw_counts(mu[:, None].expand(3, 200_000).contiguous(), torch.Generator().manual_seed(0))
    photons = inverse_anscombe(x.double().numpy() * 0.4 + 1.4, 0.02)
    np.testing.assert_allclose(photons.mean(1), levels.numpy(), rtol=2e-2)
    np.testing.assert_allclose(photons.var(1), levels.numpy() + 0.02**2, rtol=3e-2)
    assert np.mean(np.abs(photons - np.round(photons)) < 0.1) > 0.99  # counts: integers up to the read noise
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    a = model.decode(z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, model.decode(z, generator=torch.Generator().manual_seed(2))) and model.last_nfe == 0


@pytest.mark.parametrize("kind, read_noise", [("anscombe", 0.02), ("photon", 0.02), ("photon", 1.0)])  # 1.0: Gaussian split
def test_photon_split_gives_two_independent_copies_of_one_signal(kind: str, read_noise: float) -> None:
    """Copy A (what the encoder sees, back at the full level) and copy B (the target, in photons) both average to
    the photon level, and their noises are uncorrelated: the mean head cannot learn A's noise from B."""
    noise = PixelNoise(kind, center=1.4, scale=0.4, read_noise_photons=read_noise)
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.1, 0.5, 4.0])[:, None].expand(3, 200_000)
    photons = torch.poisson(levels, generator=gen) + read_noise * torch.randn(levels.shape, generator=gen)
    x = noise.from_photons(photons)
    inside = photons > -0.375 - read_noise**2  # the Anscombe transform's domain (below it clamps)
    torch.testing.assert_close(noise.to_photons(x)[inside], photons[inside], atol=1e-4, rtol=1e-5)
    seen, target = noise.split(x, 0.5, gen)
    a = noise.to_photons(seen)
    for row in range(3):
        level = float(levels[row, 0])
        assert float(a[row].mean()) == pytest.approx(level, rel=0.03, abs=0.01)
        assert float(target[row].mean()) == pytest.approx(level, rel=0.03, abs=0.01)
        cov = float(torch.cov(torch.stack([a[row] - level, target[row] - level]))[0, 1])
        # uncorrelated noises: within 5% of a copy's variance (the Gaussian split estimates the variance from the
        # pixel itself, clamped at 0: measured -4% at 0.1 photons under 1 photon of read noise; counts: ~0)
        assert abs(cov) < 0.05 * 2 * (level + read_noise**2) + 0.004, (level, cov)
        # each copy holds half the photons, scaled back: twice the Poisson variance
        assert float(target[row].var()) == pytest.approx(2 * (level + read_noise**2), rel=0.08)
    with pytest.raises(ModelError, match="photon_split"):
        PixelNoise("constant", constant_std=0.3).to_photons(x)


def test_photon_split_training_step_is_finite_and_rules_are_checked() -> None:
    model = _starved("model.mean_target=photon_split").train()
    x = model.pixel_noise.from_photons(torch.poisson(torch.full((2, 1, 9, 16, 16), 0.2),
                                                     generator=torch.Generator().manual_seed(0)))
    loss, metrics = model.training_loss(x, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["loss_mean"]) > 0
    assert all(p.grad is not None for p in model.encoder.parameters())  # the encoder learns through the target
    with pytest.raises(ConfigError, match="split_fraction"):
        compose("train_ae", ["experiment=ae_tiny", "model.mean_target=photon_split", "model.split_fraction=1.0"])
    with pytest.raises(ConfigError, match="mean_target"):
        compose("train_ae", ["experiment=ae_tiny", "model.mean_target=clean"])
    with pytest.raises(ConfigError, match="decoder_form=mean_flow"):
        compose("train_ae", ["experiment=ae_tiny", "model.mean_target=photon_split", "model.decoder_form=flow"])
