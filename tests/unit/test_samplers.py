"""Samplers on analytic cases: Gaussian data with the exact velocity / x0 / eps, exact endpoints, orders, NFE."""

from __future__ import annotations

import math

import pytest
import torch

from cadiff.diffusion import samplers
from cadiff.diffusion.ddpm import DDPM
from cadiff.errors import ConfigError

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


# ---------------------------------------------------------------------------------------------------------
# time grids

GRIDS = ["uniform", "shift:0.3", "shift:3", "rho:0.5", "rho:2", "rho:7"]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("num_steps", [1, 2, 5, 37])
def test_every_grid_runs_strictly_down_from_exactly_one_to_exactly_zero(grid: str, num_steps: int) -> None:
    ts = samplers.time_grid(num_steps, grid=grid)
    assert len(ts) == num_steps + 1 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:])), ts
    # the training shift's rounding never leaves the endpoints either (0.3 - 1 is inexact in binary)
    shifted = samplers.time_grid(num_steps, shift=0.3)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0


def test_unit_shift_and_unit_rho_are_the_uniform_grid_bit_for_bit() -> None:
    for n in (1, 4, 10, 33):
        uniform = [float(v) for v in torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)]
        assert samplers.time_grid(n) == uniform
        assert samplers.time_grid(n, grid="shift:1") == uniform
        assert samplers.time_grid(n, grid="shift:1.0") == uniform
        assert samplers.time_grid(n, grid="rho:1") == uniform
        # an explicit shift grid replaces the training shift; `uniform` keeps it (the behaviour before grids)
        assert samplers.time_grid(n, shift=3.0, grid="shift:1") == uniform
        assert samplers.time_grid(n, shift=3.0) == samplers.time_grid(n, grid="shift:3")


def test_data_end_grids_pack_steps_toward_t_zero() -> None:
    for grid in ("shift:0.5", "rho:2"):
        ts = samplers.time_grid(8, grid=grid)
        assert ts[-2] < 1 / 8 and ts[1] < 7 / 8, (grid, ts)  # finer last step, coarser first step
    assert samplers.time_grid(4, grid="rho:2") == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    assert samplers.time_grid(2, grid="shift:0.5")[1] == pytest.approx(0.5 * 0.5 / (1 - 0.5 * 0.5))


@pytest.mark.parametrize("spec", ["", "rho", "rho:", "rho:0", "rho:-2", "shift:nan", "shift:inf", "shift:x",
                                  "uniform:2", "edm:7", "karras", None])
def test_malformed_grid_specs_raise_one_line_config_errors(spec: object) -> None:
    with pytest.raises(ConfigError, match=r"time grid .*expected 'uniform', 'shift:S' \(S > 0\) or 'rho:R'"):
        samplers.time_grid(4, grid=spec)  # type: ignore[arg-type]


def _narrow_gaussian_velocity(std: float):
    """Exact velocity for x0 ~ N(MU, std^2): with a small ``std`` (pixel noise) it is stiff near t = 0."""
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x.dim() - 1)))
        return -MU + (t - (1 - t) * std**2) / ((1 - t) ** 2 * std**2 + t**2) * (x - (1 - t) * MU)
    return velocity


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_data_end_grids_integrate_a_stiff_known_ode_more_accurately(sampler: str) -> None:
    std = 0.1
    velocity, x1 = _narrow_gaussian_velocity(std), x1_batch()
    exact = MU + std * x1
    for nfe in (4, 6, 8, 10):
        steps = nfe if sampler == "euler" else nfe // 2
        error = {}
        for grid in ("uniform", "shift:0.5", "rho:2"):
            x0, used = samplers.sample_flow(velocity, x1, sampler, steps, grid=grid)
            assert used == nfe
            error[grid] = float((x0 - exact).abs().max())
        assert error["shift:0.5"] < 0.8 * error["uniform"], (nfe, error)
        assert error["rho:2"] < 0.9 * error["uniform"], (nfe, error)


def test_every_grid_converges_to_the_exact_transport_map() -> None:
    x1 = x1_batch()
    exact = MU + S * x1
    for grid in GRIDS:
        coarse, _ = samplers.sample_flow(flow_velocity, x1, "heun", 8, grid=grid)
        fine, _ = samplers.sample_flow(flow_velocity, x1, "heun", 64, grid=grid)
        # 8x the steps: >= 8x smaller error (rho < 1 crowds t = 1 and is first order; the others are second)
        assert float((fine - exact).abs().max()) < float((coarse - exact).abs().max()) / 8, grid


def test_objectives_sample_on_their_configured_grid_unless_told_otherwise() -> None:
    from cadiff.diffusion.flow import FlowMatching

    x1 = x1_batch(64)
    default = FlowMatching(sampler="heun", num_steps=3, grid="rho:2")
    on_rho, nfe = default.sample(flow_velocity, x1)
    assert nfe == 6 and torch.equal(on_rho, samplers.sample_flow(flow_velocity, x1, "heun", 3, grid="rho:2")[0])
    on_uniform, _ = default.sample(flow_velocity, x1, grid="uniform")
    assert torch.equal(on_uniform, samplers.sample_flow(flow_velocity, x1, "heun", 3)[0])
    assert not torch.equal(on_rho, on_uniform)
    with pytest.raises(ConfigError, match="time grid 'rho:0'"):
        default.sample(flow_velocity, x1, grid="rho:0")
    with pytest.raises(ConfigError, match="time grid 'edm'"):
        FlowMatching(grid="edm")
    ddpm = DDPM("cosine", "eps", sampler="ddim", num_steps=4, grid="rho:2")
    a, _ = ddpm.sample(lambda x, t: torch.zeros_like(x), x1)
    b, _ = samplers.sample_vp(lambda x, t: ddpm.predict_x0_eps(torch.zeros_like(x), x, t), x1, ddpm.schedule,
                              "ddim", 4, grid="rho:2")
    assert torch.equal(a, b)
