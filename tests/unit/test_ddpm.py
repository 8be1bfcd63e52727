"""Continuous-time DDPM: schedules, eps/v parametrizations, loss, and sampling through the shared API."""

from __future__ import annotations

import math

import pytest
import torch

from cadiff.diffusion.ddpm import DDPM, MIN_SNR_GAMMA, T_MIN, CosineVP, LinearVP
from cadiff.diffusion.flow import sample_time
from cadiff.errors import ConfigError
from cadiff.models.registry import build_objective

MU, S = 0.7, 0.4
T = torch.linspace(0, 1, 101, dtype=torch.float64)


@pytest.mark.parametrize("schedule", [LinearVP(), CosineVP()])
def test_schedules_are_variance_preserving_and_monotone(schedule) -> None:
    a, s = schedule.alpha_sigma(T)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))
    assert float(a[0]) == pytest.approx(1.0) and float(s[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(a[-1]) == pytest.approx(math.exp(-10.05 / 2), rel=1e-3)  # both end at the same SNR
    assert bool((a[1:] <= a[:-1]).all())
    lam = schedule.log_snr(T[1:])
    assert bool((lam[1:] <= lam[:-1]).all())


@pytest.mark.parametrize("schedule", [LinearVP(), CosineVP()])
def test_schedule_derivatives_match_finite_differences(schedule) -> None:
    t, h = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64), 1e-6
    da, ds = schedule.d_alpha_sigma(t)
    ap, sp = schedule.alpha_sigma(t + h)
    am, sm = schedule.alpha_sigma(t - h)
    assert torch.allclose(da, (ap - am) / (2 * h), rtol=1e-5)
    assert torch.allclose(ds, (sp - sm) / (2 * h), rtol=1e-5)


def test_cosine_schedule_matches_nichol_dhariwal() -> None:
    s = 0.008
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0.1, 0.5, 0.8):
        assert float(CosineVP().alpha_bar(torch.tensor(t, dtype=torch.float64))) == pytest.approx(f(t) / f(0.0))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_targets_invert_to_x0_and_eps(prediction: str) -> None:
    objective = DDPM("cosine", prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.7, 0.95], dtype=torch.float64)
    a, s = (u.view(-1, 1) for u in objective.schedule.alpha_sigma(t))
    x_t = a * x0 + s * eps
    x0_hat, eps_hat = objective.predict_x0_eps(objective.target(x0, eps, t), x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)
    if prediction == "v":
        assert torch.allclose(objective.target(x0, eps, t), a * eps - s * x0)


def _oracle(objective: DDPM, x0: torch.Tensor):
    """Network output that is exact when the data is the single point ``x0``."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = (u.view(-1, *([1] * (x_t.dim() - 1))) for u in objective.schedule.alpha_sigma(t.to(x_t.dtype)))
        eps = (x_t - a * x0) / s
        return objective.target(x0, eps, t)

    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_is_zero_for_the_oracle_and_weights_follow_min_snr(prediction: str, weighting: str) -> None:
    objective = DDPM("linear", prediction, time_sampler="uniform", loss_weighting=weighting)
    x0 = torch.randn(64, 1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oracle = _oracle(objective, x0)
    assert float(objective.loss(oracle, x0, torch.Generator().manual_seed(2))) < 1e-18
    # an output off by exactly 1 everywhere: the loss is the mean weight of the drawn times
    loss = float(objective.loss(lambda x, t: oracle(x, t) + 1, x0, torch.Generator().manual_seed(3)))
    t = sample_time(64, "uniform", generator=torch.Generator().manual_seed(3)).clamp(T_MIN, 1.0).double()
    if weighting == "none":
        expected = 1.0
    else:
        snr = objective.schedule.log_snr(t).exp()
        expected = float((snr.clamp(max=MIN_SNR_GAMMA) / (snr if prediction == "eps" else snr + 1)).mean())
    assert loss == pytest.approx(expected, rel=1e-6)


def _gaussian_model(objective: DDPM):
    """Exact eps/v network for data ~ N(MU, S^2)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = (u.view(-1, 1) for u in objective.schedule.alpha_sigma(t))
        var = a**2 * S**2 + s**2
        eps = s * (x - a * MU) / var
        x0 = MU + a * S**2 * (x - a * MU) / var
        return eps if objective.prediction == "eps" else a * eps - s * x0

    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler,nfe,tol_std", [("ddim", 64, 0.01), ("euler", 64, 0.02), ("heun", 127, 0.01),
                                                 ("ancestral", 64, 0.06)])
def test_objective_samplers_reproduce_gaussian_data(prediction: str, sampler: str, nfe: int, tol_std: float) -> None:
    objective = build_objective({"objective": "ddpm", "ddpm_schedule": "cosine", "ddpm_prediction": prediction,
                                 "sampler": sampler, "num_steps": 64})
    assert isinstance(objective, DDPM)
    noise = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0, used = objective.sample(_gaussian_model(objective), noise, generator=torch.Generator().manual_seed(1))
    assert used == nfe
    assert abs(float(x0.mean()) - MU) < 0.02
    assert abs(float(x0.std()) - S) < tol_std


def test_bad_ddpm_options_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="ddpm_schedule"):
        DDPM("sigmoid")
    with pytest.raises(ConfigError, match="ddpm_prediction"):
        DDPM("cosine", "x0")
    with pytest.raises(ConfigError, match="midpoint"):
        build_objective({"objective": "ddpm", "sampler": "midpoint"})
