"""Flow matching: path and velocity, time samplers, weighting, the loss against its analytic value, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from cadiff.diffusion import flow
from cadiff.diffusion.flow import FlowMatching
from cadiff.errors import ConfigError
from cadiff.models.registry import build_objective

MU, S = 0.7, 0.4


def test_path_endpoints_and_velocity_is_its_time_derivative() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    assert torch.equal(flow.path(x0, eps, torch.zeros(3, dtype=torch.float64)), x0)
    assert torch.equal(flow.path(x0, eps, torch.ones(3, dtype=torch.float64)), eps)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-6
    numeric = (flow.path(x0, eps, t + h) - flow.path(x0, eps, t - h)) / (2 * h)
    assert torch.allclose(numeric, flow.velocity_target(x0, eps), atol=1e-8)


def test_time_samplers_have_the_configured_laws() -> None:
    g = torch.Generator().manual_seed(0)
    u = flow.sample_time(200_000, "uniform", generator=g)
    assert 0 <= float(u.min()) and float(u.max()) <= 1 and abs(float(u.mean()) - 0.5) < 0.005
    ln = flow.sample_time(200_000, "logit_normal", logit_mean=0.5, logit_std=0.8, generator=g)
    logits = torch.log(ln / (1 - ln))
    assert abs(float(logits.mean()) - 0.5) < 0.01 and abs(float(logits.std()) - 0.8) < 0.01
    shifted = flow.sample_time(200_000, "uniform", shift=3.0, generator=g)
    # the median of a shifted uniform is the shifted median
    assert float(shifted.median()) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.005)
    assert float(shifted.mean()) > 0.6
    a = flow.sample_time(5, generator=torch.Generator().manual_seed(7))
    b = flow.sample_time(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        flow.sample_time(5, "beta")


def test_min_snr_weight_is_t_squared_times_clipped_snr() -> None:
    t = torch.tensor([0.05, 0.2, 0.31, 0.5, 0.9], dtype=torch.float64)
    snr = ((1 - t) / t) ** 2
    assert torch.allclose(flow.min_snr_weight(t), t**2 * snr.clamp(max=flow.MIN_SNR_GAMMA))


def _exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 1).to(x.dtype)
    var_t = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) / var_t * (x - (1 - t) * MU)


def _floor(t: torch.Tensor) -> torch.Tensor:
    """Var(eps - x0 | x_t): the loss of the exact velocity at time t for x0 ~ N(MU, S^2)."""
    return 1 + S**2 - (t - (1 - t) * S**2) ** 2 / ((1 - t) ** 2 * S**2 + t**2)


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_of_the_exact_velocity_equals_the_analytic_expectation(weighting: str) -> None:
    objective = FlowMatching(time_sampler="uniform", loss_weighting=weighting)
    x0 = MU + S * torch.randn(100_000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = float(objective.loss(_exact_velocity, x0, generator=torch.Generator().manual_seed(1)))
    grid = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    weight = flow.min_snr_weight(grid) if weighting == "min_snr" else torch.ones_like(grid)
    expected = float((weight * _floor(grid)).mean())
    assert loss == pytest.approx(expected, rel=0.01)
    # any other model has a larger loss on the same draws
    worse = float(objective.loss(lambda x, t: _exact_velocity(x, t) + 0.3, x0, generator=torch.Generator().manual_seed(1)))
    assert worse > 1.05 * loss


def test_loss_is_zero_for_an_oracle_that_knows_the_single_data_point() -> None:
    x0 = torch.randn(4, 1, 5, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    objective = FlowMatching(time_sampler="logit_normal")

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.view(-1, 1, 1, 1, 1).to(x_t.dtype)
        return (x_t - x0) / tb  # eps - x0 = (x_t - x0) / t on the linear path

    assert float(objective.loss(oracle, x0, torch.Generator().manual_seed(2))) < 1e-20
    assert float(objective.loss(lambda x, t: torch.zeros_like(x), x0, torch.Generator().manual_seed(2))) > 0.5


def test_loss_honours_the_generator() -> None:
    objective = FlowMatching()
    x0 = torch.randn(2, 1, 5, 4, 4)
    model = lambda x, t: 0.5 * x  # noqa: E731
    a = objective.loss(model, x0, torch.Generator().manual_seed(3))
    b = objective.loss(model, x0, torch.Generator().manual_seed(3))
    c = objective.loss(model, x0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_objective_sample_reproduces_the_data_law_and_reports_nfe() -> None:
    objective = build_objective({"objective": "flow", "sampler": "heun", "num_steps": 12})
    assert isinstance(objective, FlowMatching)
    noise = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0, nfe = objective.sample(_exact_velocity, noise)
    assert nfe == 24
    assert abs(float(x0.mean()) - MU) < 0.02 and abs(float(x0.std()) - S) < 0.01
    _, nfe = objective.sample(_exact_velocity, noise[:4], sampler="euler", num_steps=5)
    assert nfe == 5
    with pytest.raises(ConfigError, match="ddim"):
        objective.sample(_exact_velocity, noise[:4], sampler="ddim")


@pytest.mark.parametrize("std", [0.1, 0.5, 2.0])
def test_gaussian_velocity_coeff_is_the_exact_velocity_of_gaussian_data(std: float) -> None:
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    k = flow.gaussian_velocity_coeff(t, std)
    assert torch.allclose(k[[0, -1]], torch.tensor([-1.0, 1.0]))
    # Monte Carlo: k(t) = Cov(eps - x0, x_t) / Var(x_t) for x0 ~ N(0, std^2)
    gen = torch.Generator().manual_seed(0)
    x0 = std * torch.randn(400_000, generator=gen, dtype=torch.float64)
    eps = torch.randn(400_000, generator=gen, dtype=torch.float64)
    for ti, ki in zip(t.tolist()[1:-1], k.tolist()[1:-1]):
        xt = (1 - ti) * x0 + ti * eps
        assert abs(float(((eps - x0) * xt).mean() / (xt * xt).mean()) - ki) < 0.01 * max(1.0, abs(ki))
    # integrating dx/dt = k(t) x from t = 1 to 0 scales N(0, 1) to exactly N(0, std^2)
    steps = 20_000
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    mid = (grid[:-1] + grid[1:]) / 2
    log_scale = float((flow.gaussian_velocity_coeff(mid, std).double() * (grid[1:] - grid[:-1])).sum())
    assert abs(math.exp(log_scale) - std) < 1e-3 * std
