"""Flow matching with the linear (rectified-flow) path; t = 0 is data, t = 1 is noise.

Path ``x_t = (1 - t) x0 + t eps`` with ``eps ~ N(0, I)`` (Lipman et al. 2023, arXiv:2210.02747; Liu et al. 2023,
arXiv:2209.03003); the model regresses the velocity ``dx_t/dt = eps - x0`` and sampling integrates the ODE from
``t = 1`` to ``t = 0``. Training times come from a uniform or logit-normal law (Esser et al. 2024, SD3,
arXiv:2403.03206) and may be pushed toward noise by the resolution shift ``t' = s t / (1 + (s - 1) t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cadiff.diffusion import samplers
from cadiff.diffusion.samplers import Objective, broadcast_time, draw_rand, draw_randn, shift_time

__all__ = ["FlowMatching", "path", "velocity_target", "sample_time", "shift_time", "min_snr_weight",
           "gaussian_velocity_coeff", "gaussian_path_std"]

MIN_SNR_GAMMA = 5.0  # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", arXiv:2303.09556


def path(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t eps`` with ``t`` of shape ``[B]``."""
    tb = broadcast_time(t, x0)
    return (1 - tb) * x0 + tb * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The conditional velocity ``u_t = eps - x0`` of the linear path."""
    return eps - x0


def gaussian_velocity_coeff(t: Tensor, std: float | Tensor) -> Tensor:
    """``k(t)`` with ``E[eps - x0 | x_t] = k(t) x_t`` for zero-mean data ``x0 ~ N(0, std^2)`` per element.

    ``x_t = (1 - t) x0 + t eps`` gives ``k(t) = Cov(eps - x0, x_t) / Var(x_t)
    = (t - (1 - t) std^2) / ((1 - t)^2 std^2 + t^2)``: ``-1`` at ``t = 0``, ``+1`` at ``t = 1``. The linear
    velocity ``k(t) x_t`` transports ``N(0, 1)`` exactly onto ``N(0, std^2)`` (the flow analogue of EDM's
    ``c_skip`` preconditioning for a Gaussian of known variance, Karras et al. 2022, arXiv:2206.00364).
    ``std`` may be a tensor broadcastable against ``t`` (a per-pixel noise level).
    """
    t = t.float()
    var = std.float() ** 2 if isinstance(std, Tensor) else float(std) ** 2
    return (t - (1 - t) * var) / ((1 - t) ** 2 * var + t**2)


def gaussian_path_std(t: Tensor, std: float | Tensor) -> Tensor:
    """``s(t) = sqrt((1 - t)^2 std^2 + t^2)``, the std of ``x_t`` for ``x0 ~ N(0, std^2)``; ``s'/s = k(t)``.

    Along the exact Gaussian flow ``x_t / s(t)`` is constant, which is what lets the stage-1 decoder integrate
    its analytic noise term exactly (:meth:`cadiff.models.autoencoder.DiffusionAutoencoder.decode`).
    """
    t = t.float()
    var = std.float() ** 2 if isinstance(std, Tensor) else float(std) ** 2
    return ((1 - t) ** 2 * var + t**2).sqrt()


def sample_time(batch: int, kind: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                shift: float = 1.0, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """Draw ``[batch]`` training times in [0, 1]: ``uniform`` or ``logit_normal`` (sigmoid of N(m, s^2)), then shifted."""
    if kind == "uniform":
        t = draw_rand((batch,), generator, device)
    elif kind == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * draw_randn((batch,), generator, device))
    else:
        raise ValueError(f"time sampler {kind!r}: expected 'uniform' or 'logit_normal'")
    return shift_time(t, shift)


def min_snr_weight(t: Tensor, gamma: float = MIN_SNR_GAMMA) -> Tensor:
    """Min-SNR-gamma weight expressed for the velocity loss: ``t^2 min(SNR, gamma) = min((1-t)^2, gamma t^2)``.

    Min-SNR weights the x0-error by ``min(SNR, gamma)`` with ``SNR = ((1-t)/t)^2``; since ``x0_hat = x_t - t v_hat``
    the x0-error is ``t^2`` times the velocity error.
    """
    return torch.minimum((1 - t) ** 2, gamma * t**2)


class FlowMatching(Objective):
    """Flow-matching objective and ODE sampling (Euler, Heun, midpoint)."""

    samplers = tuple(samplers.FLOW_SAMPLERS)

    def __init__(self, time_sampler: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0, loss_weighting: str = "none", sampler: str = "euler", num_steps: int = 20,
                 grid: str = "uniform") -> None:
        super().__init__(sampler, num_steps, grid)
        self.time_sampler = time_sampler
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift
        self.loss_weighting = loss_weighting

    @classmethod
    def from_config(cls, cfg: Any) -> FlowMatching:
        """Build from a ``diffusion`` config (:class:`cadiff.config.DiffusionConfig` keys)."""
        return cls(cfg["time_sampler"], cfg["logit_mean"], cfg["logit_std"], cfg["shift"], cfg["loss_weighting"],
                   cfg["sampler"], cfg["num_steps"], cfg.get("grid") or "uniform")  # exports before the key: uniform

    def sample_time(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Training times ``[batch]`` from the configured law."""
        return sample_time(batch, self.time_sampler, self.logit_mean, self.logit_std, self.shift, generator, device)

    def noised(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The linear path ``(1 - t) x0 + t eps``."""
        return path(x0, eps, t.to(x0.dtype))

    def loss(self, model_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """Mean squared velocity error ``|| v(x_t, t) - (eps - x0) ||^2`` (optionally min-SNR weighted)."""
        t = self.sample_time(x0.shape[0], generator, x0.device)
        eps = draw_randn(x0.shape, generator, x0.device, x0.dtype)
        pred = model_fn(path(x0, eps, t.to(x0.dtype)), t)
        per_sample = (pred.float() - velocity_target(x0, eps).float()).pow(2).flatten(1).mean(1)
        if self.loss_weighting == "min_snr":
            per_sample = per_sample * min_snr_weight(t)
        return per_sample.mean()

    def predict_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``x0_hat = x_t - t v``."""
        return x_t - broadcast_time(t.to(x_t.dtype), x_t) * out

    def signal_scale(self, t: Tensor) -> Tensor:
        """``alpha_t = 1 - t``."""
        return 1 - t

    def shift_x0(self, out: Tensor, x_t: Tensor, t: Tensor, delta: Tensor) -> Tensor:
        """``v' = (x_t - x0_hat') / t = v - delta / t`` (no change where ``t = 0``: there ``x0_hat = x_t``)."""
        tb = broadcast_time(t.to(out.dtype), out)
        return out - torch.where(tb > 0, delta / tb.clamp_min(1e-12), torch.zeros_like(delta))

    def sample(self, model_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, sampler: str | None = None,
               num_steps: int | None = None, generator: torch.Generator | None = None,
               grid: str | None = None) -> tuple[Tensor, int]:
        """Integrate the velocity ODE from ``noise`` at t = 1 to t = 0 on ``grid`` (``uniform``: training shift)."""
        sampler, num_steps = self.resolve(sampler, num_steps)
        return samplers.sample_flow(model_fn, noise, sampler, num_steps, shift=self.shift, grid=self.resolve_grid(grid))
