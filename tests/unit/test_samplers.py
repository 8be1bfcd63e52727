"""Samplers on analytic cases: Gaussian data with the exact velocity / x0 / eps, exact endpoints, orders, NFE."""

from __future__ import annotations

import math

import pytest
import torch

from cadiff.diffusion import samplers
from cadiff.diffusion.ddpm import DDPM
from cadiff.errors import ConfigError

torch.set_num_threads(1)

MU, S = 0.7, 0.4  # data ~ N(MU, S^2) per coordinate


def flow_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t] for x0 ~ N(MU, S^2) on the path x_t = (1-t) x0 + t eps."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    var_t = (1 - t) ** 2 * S**2 + t**2
    return -MU + (t - (1 - t) * S**2) / var_t * (x - (1 - t) * MU)


def x1_batch(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _orders(errors: list[float]) -> list[float]:
    return [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]


def test_time_grid_runs_from_noise_to_data() -> None:
    ts = samplers.time_grid(4)
    assert ts == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = samplers.time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and all(a > b for a, b in zip(shifted, shifted[1:]))
    assert shifted[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    with pytest.raises(ConfigError):
        samplers.time_grid(0)


def test_flow_samplers_hit_the_exact_transport_map_at_their_order() -> None:
    x1 = x1_batch()
    exact = MU + S * x1  # the linear ODE maps N(0, 1) affinely onto N(MU, S^2)
    steps = [8, 16, 32, 64]
    errors = {}
    for name in ("euler", "heun", "midpoint"):
        errors[name] = []
        for n in steps:
            x0, nfe = samplers.sample_flow(flow_velocity, x1, name, n)
            assert nfe == (n if name == "euler" else 2 * n)
            errors[name].append(float((x0 - exact).abs().max()))
        assert all(a > b for a, b in zip(errors[name], errors[name][1:])), (name, errors[name])
    euler_order = _orders(errors["euler"])[-1]
    assert 0.8 < euler_order < 1.2, errors["euler"]
    assert _orders(errors["heun"])[-1] > 1.7, errors["heun"]
    assert _orders(errors["midpoint"])[-1] > 1.8, errors["midpoint"]
    assert errors["heun"][-1] < errors["euler"][-1] / 20


def test_flow_heun_reproduces_mean_and_variance() -> None:
    x1 = x1_batch(20000, seed=3)
    x0, nfe = samplers.sample_flow(flow_velocity, x1, "heun", 16)
    assert nfe == 32
    assert abs(float(x0.mean()) - MU) < 0.02
    assert abs(float(x0.std()) - S) < 0.01


def test_shifted_grid_still_converges() -> None:
    x1 = x1_batch()
    x0, _ = samplers.sample_flow(flow_velocity, x1, "heun", 32, shift=3.0)
    assert float((x0 - (MU + S * x1)).abs().max()) < 5e-3


def test_unknown_sampler_names_raise() -> None:
    with pytest.raises(ConfigError, match="euler"):
        samplers.sample_flow(flow_velocity, x1_batch(4), "rk45", 4)
    with pytest.raises(ConfigError, match="ddim"):
        samplers.sample_vp(lambda x, t: (x, x), x1_batch(4), DDPM().schedule, "euler", 4)


def _vp_exact(objective: DDPM):
    sched = objective.schedule

    def predict(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = (u.view(-1, 1) for u in sched.alpha_sigma(t))
        var = a**2 * S**2 + s**2
        return MU + a * S**2 * (x - a * MU) / var, s * (x - a * MU) / var

    def endpoint(x1: torch.Tensor) -> torch.Tensor:
        a1, s1 = sched.alpha_sigma(torch.tensor([1.0], dtype=torch.float64))
        return MU + S * (x1 - a1 * MU) / torch.sqrt(a1**2 * S**2 + s1**2)

    return predict, endpoint


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_is_a_first_order_solver_of_the_probability_flow_ode(schedule: str) -> None:
    objective = DDPM(schedule, "eps", sampler="ddim")
    predict, endpoint = _vp_exact(objective)
    x1 = x1_batch()
    errors = []
    for n in (8, 16, 32, 64):
        x0, nfe = samplers.ddim(predict, x1, objective.schedule, samplers.time_grid(n))
        assert nfe == n
        errors.append(float((x0 - endpoint(x1)).abs().max()))
    orders = _orders(errors)
    assert all(0.7 < o < 1.3 for o in orders), errors


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ancestral_sampling_matches_mean_and_variance(schedule: str) -> None:
    objective = DDPM(schedule, "eps", sampler="ancestral")
    predict, _ = _vp_exact(objective)
    x1 = x1_batch(20000, seed=4)
    stds = []
    for n in (32, 256):
        x0, nfe = samplers.ancestral(predict, x1, objective.schedule, samplers.time_grid(n),
                                     torch.Generator().manual_seed(n))
        assert nfe == n
        assert abs(float(x0.mean()) - MU) < 0.02
        stds.append(float(x0.std()))
    assert abs(stds[1] - S) < 0.02, stds
    assert abs(stds[1] - S) < abs(stds[0] - S), "ancestral sampling should improve with more steps"


def test_ancestral_is_stochastic_and_ddim_deterministic() -> None:
    objective = DDPM("cosine", "eps")
    predict, _ = _vp_exact(objective)
    x1 = x1_batch(8)
    ts = samplers.time_grid(10)
    a, _ = samplers.ancestral(predict, x1, objective.schedule, ts, torch.Generator().manual_seed(0))
    b, _ = samplers.ancestral(predict, x1, objective.schedule, ts, torch.Generator().manual_seed(1))
    c, _ = samplers.ancestral(predict, x1, objective.schedule, ts, torch.Generator().manual_seed(0))
    assert not torch.equal(a, b) and torch.equal(a, c)
    d1, _ = samplers.ddim(predict, x1, objective.schedule, ts)
    d2, _ = samplers.ddim(predict, x1, objective.schedule, ts)
    assert torch.equal(d1, d2)
