"""Continuous-time DDPM: variance-preserving path ``x_t = alpha_t x0 + sigma_t eps``, ``alpha_t^2 + sigma_t^2 = 1``.

Same conventions as flow matching (t = 0 data, t = 1 noise, ``model_fn(x_t, t)`` with ``t in [0, 1]``) and the
same :class:`~cadiff.diffusion.samplers.Objective` API. Schedules: the VP-SDE linear beta schedule (Song et al.
2021, arXiv:2011.13456, beta in [0.1, 20]) and the cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672,
s = 0.008). Predictions: ``eps`` (Ho et al. 2020) or ``v = alpha eps - sigma x0`` (Salimans & Ho 2022,
arXiv:2202.00512). Samplers: DDIM, ancestral, and Euler/Heun on the probability-flow ODE
``dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat`` (the DDIM ODE written in t).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cadiff.diffusion import samplers
from cadiff.diffusion.flow import sample_time
from cadiff.diffusion.samplers import Objective, broadcast_time, draw_randn
from cadiff.errors import ConfigError

MIN_SNR_GAMMA = 5.0  # Hang et al. 2023, arXiv:2303.09556
T_MIN = 1e-4  # training times below this carry no signal (sigma ~ 0) and make eps-targets ill-posed


class VPSchedule(ABC):
    """A VP noise schedule given by ``alpha_bar(t) = alpha_t^2`` and its time derivative."""

    @abstractmethod
    def alpha_bar(self, t: Tensor) -> Tensor:
        """``alpha_t^2`` (signal fraction of the variance)."""

    @abstractmethod
    def d_alpha_bar(self, t: Tensor) -> Tensor:
        """``d alpha_bar / dt``."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` in ``t``'s dtype (computed in float64)."""
        ab = self.alpha_bar(t.double()).clamp(0.0, 1.0)
        return ab.sqrt().to(t.dtype), (1 - ab).sqrt().to(t.dtype)

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(d alpha/dt, d sigma/dt) = (ab' / 2 alpha, -ab' / 2 sigma)``; infinite sigma' at t = 0 (sqrt(t) start)."""
        td = t.double()
        ab, dab = self.alpha_bar(td), self.d_alpha_bar(td)
        return (dab / (2 * ab.sqrt())).to(t.dtype), (-dab / (2 * (1 - ab).sqrt())).to(t.dtype)

    def log_snr(self, t: Tensor) -> Tensor:
        """``log(alpha_t^2 / sigma_t^2)``."""
        ab = self.alpha_bar(t.double())
        return (ab.log() - (1 - ab).log()).to(t.dtype)


class LinearVP(VPSchedule):
    """``alpha_bar = exp(-(b0 t + (b1 - b0) t^2 / 2))``, the continuous limit of DDPM's linear betas."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min, self.beta_max = beta_min, beta_max

    def alpha_bar(self, t: Tensor) -> Tensor:
        return torch.exp(-(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2))

    def d_alpha_bar(self, t: Tensor) -> Tensor:
        return -(self.beta_min + (self.beta_max - self.beta_min) * t) * self.alpha_bar(t)


class CosineVP(VPSchedule):
    """``alpha_bar = cos^2(phi_t) / cos^2(phi_0)``, ``phi_t = (t + s) / (1 + s) * pi / 2``, floored at ``ab_min``.

    The floor (the linear schedule's terminal ``alpha_bar(1) = exp(-10.05)``) keeps ``alpha_1 > 0`` so that
    eps-prediction stays invertible at t = 1 and both schedules end at the same SNR.
    """

    def __init__(self, s: float = 0.008, alpha_bar_min: float = math.exp(-10.05)) -> None:
        self.s, self.alpha_bar_min = s, alpha_bar_min
        self._cos0 = math.cos(s / (1 + s) * math.pi / 2)

    def _phi(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * math.pi / 2

    def alpha_bar(self, t: Tensor) -> Tensor:
        return (torch.cos(self._phi(t)) / self._cos0).pow(2).clamp_min(self.alpha_bar_min)

    def d_alpha_bar(self, t: Tensor) -> Tensor:
        phi = self._phi(t)
        raw = (torch.cos(phi) / self._cos0).pow(2)
        d = -torch.sin(2 * phi) * (math.pi / 2 / (1 + self.s)) / self._cos0**2
        return torch.where(raw > self.alpha_bar_min, d, torch.zeros_like(d))


SCHEDULES = {"linear": LinearVP, "cosine": CosineVP}


class DDPM(Objective):
    """Continuous-time VP diffusion with eps- or v-prediction, sharing the flow objective's API."""

    samplers = (*samplers.VP_SAMPLERS, "euler", "heun")  # VP samplers + Euler/Heun on the probability-flow ODE

    def __init__(self, schedule: str = "cosine", prediction: str = "v", time_sampler: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0, loss_weighting: str = "none",
                 sampler: str = "ddim", num_steps: int = 20, grid: str = "uniform") -> None:
        super().__init__(sampler, num_steps, grid)
        if schedule not in SCHEDULES:
            raise ConfigError(f"diffusion.ddpm_schedule = {schedule!r}: expected one of {sorted(SCHEDULES)}")
        if prediction not in ("eps", "v"):
            raise ConfigError(f"diffusion.ddpm_prediction = {prediction!r}: expected 'eps' or 'v'")
        self.schedule = SCHEDULES[schedule]()
        self.prediction = prediction
        self.time_sampler, self.logit_mean, self.logit_std, self.shift = time_sampler, logit_mean, logit_std, shift
        self.loss_weighting = loss_weighting

    @classmethod
    def from_config(cls, cfg: Any) -> DDPM:
        """Build from a ``diffusion`` config (:class:`cadiff.config.DiffusionConfig` keys)."""
        return cls(cfg["ddpm_schedule"], cfg["ddpm_prediction"], cfg["time_sampler"], cfg["logit_mean"],
                   cfg["logit_std"], cfg["shift"], cfg["loss_weighting"], cfg["sampler"], cfg["num_steps"],
                   cfg.get("grid") or "uniform")

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Regression target: ``eps`` or ``v = alpha eps - sigma x0``."""
        if self.prediction == "eps":
            return eps
        a, s = (broadcast_time(u, x0) for u in self.schedule.alpha_sigma(t.to(x0.dtype)))
        return a * eps - s * x0

    def predict_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Convert the network output at ``(x_t, t)`` into ``(x0_hat, eps_hat)``."""
        a, s = (broadcast_time(u, x_t) for u in self.schedule.alpha_sigma(t.to(x_t.dtype)))
        if self.prediction == "eps":
            return (x_t - s * out) / a, out
        return a * x_t - s * out, s * x_t + a * out

    def predict_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.predict_x0_eps(out, x_t, t)[0]

    def signal_scale(self, t: Tensor) -> Tensor:
        return self.schedule.alpha_sigma(t)[0]

    def shift_x0(self, out: Tensor, x_t: Tensor, t: Tensor, delta: Tensor) -> Tensor:
        """``x0' = x0_hat + delta``, ``eps' = (x_t - alpha x0') / sigma``, returned as the eps or v prediction."""
        a, s = (broadcast_time(u, x_t) for u in self.schedule.alpha_sigma(t.to(x_t.dtype)))
        x0 = self.predict_x0_eps(out, x_t, t)[0] + delta
        eps = (x_t - a * x0) / s
        return eps if self.prediction == "eps" else a * eps - s * x0

    def noised(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The VP state ``alpha_t x0 + sigma_t eps``."""
        a, s = (broadcast_time(u, x0) for u in self.schedule.alpha_sigma(t.to(x0.dtype)))
        return a * x0 + s * eps

    def loss(self, model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """Mean squared error of the eps/v prediction (optionally min-SNR-gamma weighted)."""
        t = sample_time(x0.shape[0], self.time_sampler, self.logit_mean, self.logit_std, self.shift, generator,
                        x0.device).clamp(T_MIN, 1.0)
        eps = draw_randn(x0.shape, generator, x0.device, x0.dtype)
        a, s = (broadcast_time(u, x0) for u in self.schedule.alpha_sigma(t.to(x0.dtype)))
        out = model_fn(a * x0 + s * eps, t)
        per_sample = (out.float() - self.target(x0, eps, t).float()).pow(2).flatten(1).mean(1)
        if self.loss_weighting == "min_snr":
            snr = self.schedule.log_snr(t.double()).exp()
            denom = snr if self.prediction == "eps" else snr + 1
            per_sample = per_sample * (snr.clamp(max=MIN_SNR_GAMMA) / denom).to(per_sample.dtype)
        return per_sample.mean()

    def velocity(self, model_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor) -> Tensor:
        """Probability-flow ODE velocity ``alpha'(t) x0_hat + sigma'(t) eps_hat``."""
        x0_hat, eps_hat = self.predict_x0_eps(model_fn(x, t), x, t)
        da, ds = (broadcast_time(u, x) for u in self.schedule.d_alpha_sigma(t.to(x.dtype)))
        return da * x0_hat + ds * eps_hat

    def sample(self, model_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, sampler: str | None = None,
               num_steps: int | None = None, generator: torch.Generator | None = None,
               grid: str | None = None) -> tuple[Tensor, int]:
        """DDIM/ancestral on the t-grid, or Euler/Heun on the probability-flow ODE; returns (x0, nfe)."""
        sampler, num_steps = self.resolve(sampler, num_steps)
        grid = self.resolve_grid(grid)
        if sampler in samplers.VP_SAMPLERS:
            return samplers.sample_vp(lambda x, t: self.predict_x0_eps(model_fn(x, t), x, t), noise, self.schedule,
                                      sampler, num_steps, generator, grid)
        ts = samplers.time_grid(num_steps, grid=grid)
        with torch.no_grad():
            if sampler == "euler":
                return samplers.euler(lambda x, t: self.velocity(model_fn, x, t), noise, ts)
            # the last Heun correction would evaluate sigma'(0) = inf, so the final step is Euler (as in EDM)
            return samplers.heun(lambda x, t: self.velocity(model_fn, x, t), noise, ts, euler_last=True)
