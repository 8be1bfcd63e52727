"""Samplers as plain loops over a time grid from t = 1 (noise) to t = 0 (data), each returning its NFE.

Time grids (``grid``): ``uniform`` (uniform in t, then the objective's resolution shift - the training one),
``shift:S`` (the same map with its own ``S``: ``S < 1`` packs steps toward the data end, where the fine noise
texture forms) and ``rho:R`` (``t_i = (1 - i/N)^R``, EDM's polynomial grid (Karras et al. 2022, eq. 5) with
``sigma_min = 0``, ``sigma_max = 1`` read in t; ``R > 1`` packs steps toward data). Every grid starts at exactly
1 and ends at exactly 0.

Flow ODE ``dx/dt = v(x, t)``: Euler (1st order), Heun and explicit midpoint (2nd order; Karras et al. 2022,
EDM, arXiv:2206.00364, Alg. 1). Variance-preserving diffusion ``x_t = alpha_t x0 + sigma_t eps``: DDIM
(Song et al. 2021, arXiv:2010.02502, eq. 12) with ``eta = 0`` (deterministic) and ancestral sampling, which is
DDIM with ``eta = 1`` (the DDPM posterior ``q(x_s | x_t, x0_hat)``, Ho et al. 2020). Also the shared
:class:`Objective` interface that flow matching and DDPM implement.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from cadiff.errors import ConfigError

VelocityFn = Callable[[Tensor, Tensor], Tensor]
PredictFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x, t) -> (x0_hat, eps_hat)


def draw_randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device | str | None,
               dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``, drawn where ``generator`` lives (a CPU generator keeps
    its stream for CUDA models too; drawing on CUDA with a CPU generator raises)."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def draw_rand(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
              device: torch.device | str | None) -> Tensor:
    """Uniform [0, 1) noise of ``shape`` on ``device``, drawn where ``generator`` lives (as :func:`draw_randn`)."""
    where = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=where).to(device)


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """``t [B]`` as ``[B, 1, ..., 1]`` matching ``x``'s rank."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Resolution shift (Esser et al. 2024, SD3, eq. 23): ``s t / (1 + (s - 1) t)``; ``s > 1`` favours noise."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


GRID_FORMS = "'uniform', 'shift:S' (S > 0) or 'rho:R' (R > 0)"


def parse_grid(spec: str) -> tuple[str, float | None]:
    """A time-grid spec -> ``(kind, parameter)``: ``uniform`` -> ``("uniform", None)``, ``rho:7`` -> ``("rho", 7.0)``."""
    kind, sep, value = str(spec).partition(":")
    if kind == "uniform" and not sep:
        return kind, None
    try:
        number = float(value) if kind in ("shift", "rho") else math.nan
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"time grid {spec!r}: expected {GRID_FORMS}")
    return kind, number


def time_grid(num_steps: int, shift: float = 1.0, grid: str = "uniform") -> list[float]:
    """``num_steps + 1`` decreasing times from exactly 1 to exactly 0 on ``grid`` (``uniform`` applies ``shift``)."""
    if num_steps < 1:
        raise ConfigError(f"sampler num_steps = {num_steps}: expected >= 1")
    kind, value = parse_grid(grid)
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    ts = [float(v) for v in (base**value if kind == "rho" else shift_time(base, shift if value is None else value))]
    ts[0], ts[-1] = 1.0, 0.0  # the shift's rounding may miss 1 by an ulp; the ends are exact by contract
    return ts


def _t(x: Tensor, value: float) -> Tensor:
    return torch.full((x.shape[0],), value, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------
# flow ODE solvers


def euler(velocity_fn: VelocityFn, x: Tensor, ts: list[float]) -> tuple[Tensor, int]:
    """Explicit Euler: ``x <- x + (t_next - t) v(x, t)``; NFE = steps."""
    nfe = 0
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity_fn(x, _t(x, t))
        nfe += 1
    return x, nfe


def heun(velocity_fn: VelocityFn, x: Tensor, ts: list[float], euler_last: bool = False) -> tuple[Tensor, int]:
    """Heun's trapezoidal predictor-corrector; NFE = 2 steps (minus 1 with ``euler_last``, EDM's final step)."""
    nfe = 0
    last = len(ts) - 2
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_next - t
        v = velocity_fn(x, _t(x, t))
        nfe += 1
        x_euler = x + h * v
        if euler_last and i == last:
            x = x_euler
            continue
        v_next = velocity_fn(x_euler, _t(x, t_next))
        nfe += 1
        x = x + 0.5 * h * (v + v_next)
    return x, nfe


def midpoint(velocity_fn: VelocityFn, x: Tensor, ts: list[float]) -> tuple[Tensor, int]:
    """Explicit midpoint: the slope at ``t + h/2`` after a half Euler step; NFE = 2 steps."""
    nfe = 0
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        x_half = x + 0.5 * h * velocity_fn(x, _t(x, t))
        x = x + h * velocity_fn(x_half, _t(x, t + 0.5 * h))
        nfe += 2
    return x, nfe


FLOW_SAMPLERS = {"euler": euler, "heun": heun, "midpoint": midpoint}


def sample_flow(velocity_fn: VelocityFn, x1: Tensor, sampler: str = "euler", num_steps: int = 20,
                shift: float = 1.0, grid: str = "uniform") -> tuple[Tensor, int]:
    """Integrate ``dx/dt = v`` from ``x1`` (t = 1, noise) to t = 0 on ``grid``; returns ``(x0, nfe)``."""
    if sampler not in FLOW_SAMPLERS:
        raise ConfigError(f"flow sampler {sampler!r}: expected one of {sorted(FLOW_SAMPLERS)}")
    with torch.no_grad():
        return FLOW_SAMPLERS[sampler](velocity_fn, x1, time_grid(num_steps, shift, grid))


# ---------------------------------------------------------------------------------------------------------
# VP diffusion samplers


class VPSchedule(Protocol):
    """What the VP samplers need from a schedule (implemented in :mod:`cadiff.diffusion.ddpm`)."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` for times ``t``."""
        ...


def _alpha_sigma(schedule: VPSchedule, t: float) -> tuple[float, float]:
    a, s = schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    return float(a), float(s)


def ddim(predict_fn: PredictFn, x: Tensor, schedule: VPSchedule, ts: list[float], eta: float = 0.0,
         generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """DDIM update ``x_s = a_s x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z`` with
    ``c = eta (s_s / s_t) sqrt(1 - (a_t / a_s)^2)``; the step to t = 0 returns ``x0_hat``. NFE = steps."""
    nfe = 0
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0_hat, eps_hat = predict_fn(x, _t(x, t))
        nfe += 1
        a_n, s_n = _alpha_sigma(schedule, t_next)
        if t_next <= 0.0 or s_n == 0.0:
            x = x0_hat
            continue
        a_t, s_t = _alpha_sigma(schedule, t)
        c = eta * (s_n / s_t) * math.sqrt(max(0.0, 1.0 - (a_t / a_n) ** 2)) if eta > 0 else 0.0
        x = a_n * x0_hat + math.sqrt(max(0.0, s_n**2 - c**2)) * eps_hat
        if c > 0:
            x = x + c * draw_randn(x.shape, generator, x.device, x.dtype)
    return x, nfe


def ancestral(predict_fn: PredictFn, x: Tensor, schedule: VPSchedule, ts: list[float],
              generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """Ancestral (DDPM) sampling: draw ``x_s ~ q(x_s | x_t, x0_hat)``, i.e. DDIM with ``eta = 1``."""
    return ddim(predict_fn, x, schedule, ts, eta=1.0, generator=generator)


def sample_vp(predict_fn: PredictFn, noise: Tensor, schedule: VPSchedule, sampler: str = "ddim",
              num_steps: int = 20, generator: torch.Generator | None = None,
              grid: str = "uniform") -> tuple[Tensor, int]:
    """DDIM or ancestral sampling from ``noise`` at t = 1 down to t = 0 on ``grid``; returns ``(x0, nfe)``."""
    if sampler not in VP_SAMPLERS:
        raise ConfigError(f"diffusion sampler {sampler!r}: expected one of {list(VP_SAMPLERS)}")
    with torch.no_grad():
        return VP_SAMPLERS[sampler](predict_fn, noise, schedule, time_grid(num_steps, grid=grid), generator=generator)


# the sampler names each objective accepts derive from these tables (FlowMatching.samplers, DDPM.samplers)
VP_SAMPLERS = {"ddim": ddim, "ancestral": ancestral}  # ddim: eta = 0, deterministic


# ---------------------------------------------------------------------------------------------------------
# the objective interface


class Objective(ABC):
    """A generative objective: a training loss for ``model_fn(x_t, t)`` and a sampler over the same model."""

    samplers: tuple[str, ...] = ()

    def __init__(self, sampler: str, num_steps: int, grid: str = "uniform") -> None:
        self.default_sampler, self.default_steps, self.default_grid = sampler, num_steps, grid
        self.resolve(None, None)  # the defaults obey the same rules as every later choice
        self.resolve_grid(None)

    def resolve_grid(self, grid: str | None) -> str:
        """The time grid: ``grid`` when set, else the config's; a malformed spec raises ConfigError."""
        grid = grid or self.default_grid
        parse_grid(grid)
        return grid

    def resolve(self, sampler: str | None, num_steps: int | None) -> tuple[str, int]:
        """Defaults from the config for unset arguments; unknown sampler names raise ConfigError."""
        sampler = sampler or self.default_sampler
        num_steps = num_steps or self.default_steps
        if sampler not in self.samplers:
            raise ConfigError(f"sampler {sampler!r}: expected one of {list(self.samplers)} for {type(self).__name__}")
        if num_steps < 1:
            raise ConfigError(f"num_steps = {num_steps}: expected >= 1")
        return sampler, num_steps

    @abstractmethod
    def noised(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The forward-process state ``x_t`` of data ``x0`` under noise ``eps`` at times ``t [B]``."""

    @abstractmethod
    def loss(self, model_fn: VelocityFn, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scalar training loss of ``model_fn`` on clean data ``x0`` (noise and time drawn with ``generator``)."""

    @abstractmethod
    def sample(self, model_fn: VelocityFn, noise: Tensor, sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, grid: str | None = None) -> tuple[Tensor, int]:
        """Generate from ``noise`` (the t = 1 state) on time ``grid`` (None: the config's); returns ``(x0, nfe)``."""

    @abstractmethod
    def predict_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The data estimate ``x0_hat`` of the network output ``out`` at ``(x_t, t [B])``."""

    @abstractmethod
    def signal_scale(self, t: Tensor) -> Tensor:
        """``alpha_t`` of ``x_t = alpha_t x0 + sigma_t eps`` at times ``t [B]``."""

    @abstractmethod
    def shift_x0(self, out: Tensor, x_t: Tensor, t: Tensor, delta: Tensor) -> Tensor:
        """The network output at ``(x_t, t [B])`` whose data estimate is ``predict_x0(out) + delta`` and whose noise
        estimate is what ``x_t`` then implies (reconstruction guidance edits ``x0_hat`` this way)."""
