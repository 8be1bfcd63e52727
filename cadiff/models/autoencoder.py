"""Stage 1: the diffusion autoencoder (causal encoder + causal flow-matching UNet decoder) and its baseline.

``DiffusionAutoencoder`` trains the decoder as a conditional generative model ``p(x | z)``: decoding draws a
fresh noise realization (shot noise is sampled, not averaged away). ``RegressionAutoencoder`` is the baseline
the seed describes: the same encoder and the same UNet fed ``x_t = 0`` at ``t = 0``, trained with L2/L1, so it
predicts the conditional mean and the comparison isolates the objective.

Latent regularization (``latent_reg``): ``kl`` (default) makes the encoder a diagonal Gaussian posterior and
adds ``kl_weight * KL(q(z|x) || N(0, I))``, the KL averaged per latent element, like the small KL of the
LDM autoencoders (Rombach et al. 2022, arXiv:2112.10752). It keeps the latent scale from drifting and the
latent smooth under small perturbations; the per-channel normalization before stage 2 (DESIGN.md) then
fixes the scale exactly. ``none`` uses the encoder output as is (a deterministic bottleneck).

Causality: latent frame ``i`` sees clip frames ``<= s_t i``; decoder output frame ``m`` sees ``x_t`` frames
``<= m`` and latent frames ``<= ceil(m / s_t)``. End to end, output frame ``m`` depends on clip frames up to
the end of its own latent chunk, ``s_t ceil(m / s_t)`` (chunk-causal, as in causal video VAEs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from cadiff.diffusion.flow import gaussian_velocity_coeff
from cadiff.diffusion.samplers import Objective
from cadiff.errors import ModelError
from cadiff.models.encoder import Encoder
from cadiff.models.layers import count_forward_flops, map_frames
from cadiff.models.unet3d import UNet3D

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance, as in the LDM autoencoder


class CausalAutoencoder(nn.Module, ABC):
    """Shared parts of both stage-1 models: causal encoder, UNet decoder, shape rules, FLOPs, shard units."""

    def __init__(self, model_config: dict[str, Any], objective: Objective | None = None) -> None:
        super().__init__()
        cfg = model_config
        self.model_config = cfg
        self.in_channels = int(cfg["in_channels"])
        self.z_channels = int(cfg["z_channels"])
        self.temporal_downsample = int(cfg["temporal_downsample"])
        self.spatial_downsample = int(cfg["spatial_downsample"])
        self.variational = cfg["latent_reg"] == "kl"
        self.kl_weight = float(cfg["kl_weight"]) if self.variational else 0.0
        self.objective = objective
        self.encoder = Encoder(self.in_channels, self.z_channels, cfg["base_channels"], list(cfg["channel_mult"]),
                               cfg["num_res_blocks"], self.temporal_downsample, self.spatial_downsample,
                               double_z=self.variational, recompute=bool(cfg["recompute_elementwise"]))
        self.decoder = UNet3D(self.in_channels, self.z_channels, cfg["dec_base_channels"],
                              list(cfg["dec_channel_mult"]), cfg["dec_num_res_blocks"], self.temporal_downsample,
                              self.spatial_downsample, attention=bool(cfg["dec_attention"]),
                              recompute=bool(cfg["recompute_elementwise"]))
        self._flops: dict[tuple[int, ...], float] = {}

    # shapes -------------------------------------------------------------------------------------------

    def latent_shape(self, clip_shape: tuple[int, ...] | list[int]) -> tuple[int, int, int, int]:
        """Latent ``[z, 1 + k, H/s, W/s]`` of a clip ``[C, 1 + k*s_t, H, W]`` (raises ModelError otherwise)."""
        c, t, h, w = self._check_clip_shape(tuple(clip_shape))
        s_t, s = self.temporal_downsample, self.spatial_downsample
        return (self.z_channels, 1 + (t - 1) // s_t, h // s, w // s)

    def clip_shape_for(self, latent_shape: tuple[int, ...] | list[int]) -> tuple[int, int, int, int]:
        """Clip shape ``[C, 1 + (T_z - 1) s_t, H_z s, W_z s]`` decoded from a latent ``[z, T_z, H_z, W_z]``."""
        if len(latent_shape) != 4 or latent_shape[0] != self.z_channels or min(latent_shape) < 1:
            raise ModelError(f"latent shape {tuple(latent_shape)}: expected [z_channels={self.z_channels}, T, H, W]")
        _, t, h, w = latent_shape
        s_t, s = self.temporal_downsample, self.spatial_downsample
        return (self.in_channels, 1 + (t - 1) * s_t, h * s, w * s)

    def _check_clip_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        s_t, s = self.temporal_downsample, self.spatial_downsample
        if len(shape) != 4:
            raise ModelError(f"clip shape {shape}: expected [C, T, H, W]")
        c, t, h, w = shape
        if c != self.in_channels:
            raise ModelError(f"clip shape {shape}: expected {self.in_channels} channel(s), got {c}")
        if t < 1 or (t - 1) % s_t:
            raise ModelError(f"clip shape {shape}: T = {t} frames, but the causal model needs T = 1 + k*{s_t} "
                             f"(temporal_downsample={s_t}), e.g. {1 + 2 * s_t} or {1 + 4 * s_t}")
        if h % s or w % s or h < s or w < s:
            raise ModelError(f"clip shape {shape}: H and W must be positive multiples of spatial_downsample={s}")
        return c, t, h, w

    def _check_clip(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ModelError(f"clip batch of shape {tuple(x.shape)}: expected [B, C, T, H, W]")
        self._check_clip_shape(tuple(x.shape[1:]))

    def _check_latent(self, z: Tensor) -> None:
        if z.dim() != 5:
            raise ModelError(f"latent batch of shape {tuple(z.shape)}: expected [B, z_channels, T, H, W]")
        self.clip_shape_for(tuple(z.shape[1:]))

    # encoder ------------------------------------------------------------------------------------------

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Posterior mean and clamped log-variance (None without KL regularization)."""
        self._check_clip(x)
        mean, logvar = self.encoder(x)
        return mean, None if logvar is None else logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """``[B, C, 1 + k s_t, H, W] -> [B, z, 1 + k, H/s, W/s]``: the posterior mean, or a draw if ``sample``."""
        mean, logvar = self.posterior(x)
        if sample and logvar is not None:
            return self._draw(mean, logvar, generator).contiguous()
        return mean.contiguous()  # the networks run channels-last; hand callers a plain layout

    @staticmethod
    def _draw(mean: Tensor, logvar: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def _latent_and_kl(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        mean, logvar = self.posterior(x)
        if logvar is None:
            return mean, mean.new_zeros(())
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).mean()
        return self._draw(mean, logvar, generator), kl

    # bookkeeping -------------------------------------------------------------------------------------

    def shard_units(self) -> list[nn.Module]:
        """Residual/attention blocks of encoder and decoder, the units FSDP2 shards one by one."""
        return self.encoder.res_blocks() + self.decoder.res_blocks()

    @abstractmethod
    def flop_forward(self, x: Tensor) -> Tensor:
        """The forward pass whose FLOPs define the per-sample cost: encoder + one decoder evaluation."""

    def flops_per_sample(self, input_shape: tuple[int, ...]) -> float:
        """Forward FLOPs of one training sample ``[C, T, H, W]`` (encoder + one decoder evaluation)."""
        key = tuple(int(v) for v in input_shape)
        if key not in self._flops:
            self._check_clip_shape(key)
            self._flops[key] = count_forward_flops(self.model_config, type(self), type(self).flop_forward, key)
        return self._flops[key]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Same as :meth:`training_loss`, so DDP/FSDP wrappers see the whole training step."""
        return self.training_loss(x, generator)

    @abstractmethod
    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss on a clip batch ``x`` and float metrics (random draws honour ``generator``)."""

    def reconstruct(self, x: Tensor, sampler: str | None = None, num_steps: int | None = None,
                    generator: torch.Generator | None = None, sample_latent: bool = False) -> Tensor:
        """``decode(encode(x))`` (posterior mean unless ``sample_latent``)."""
        with torch.no_grad():
            z = self.encode(x, sample=sample_latent, generator=generator)
            return self.decode(z, sampler=sampler, num_steps=num_steps, generator=generator)

    @abstractmethod
    def decode(self, z: Tensor, sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Latent ``[B, z, T_z, H_z, W_z]`` -> clip ``[B, C, 1 + (T_z - 1) s_t, H_z s, W_z s]``."""


def _box_blur_hw(x: Tensor) -> Tensor:
    """3x3 mean over H and W of each frame (borders averaged over the pixels inside); never mixes frames."""
    return map_frames(lambda f: torch.nn.functional.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False), x)


class DiffusionAutoencoder(CausalAutoencoder):
    """Causal encoder + causal UNet flow decoder ``v(x_t, t, z)``; decoding samples a fresh realization."""

    def __init__(self, model_config: dict[str, Any]) -> None:
        from cadiff.models.registry import build_objective

        super().__init__(model_config, build_objective(model_config["diffusion"]))
        self.last_nfe = 0
        self.noise_std = float(model_config.get("noise_std") or 0.0)
        self.noise_highpass = bool(model_config.get("noise_highpass", False))
        if self.noise_std and model_config["diffusion"]["objective"] != "flow":
            raise ModelError(f"model.noise_std={self.noise_std}: the analytic noise skip needs the flow objective, "
                             f"got diffusion.objective={model_config['diffusion']['objective']!r}")

    def velocity(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Decoder output at ``(x_t, t)`` given the latent ``z`` (velocity for flow, eps/v for DDPM).

        With ``noise_std`` (homoscedastic pixel noise, e.g. Anscombe-normalized data) the velocity is
        ``k(t) x_t + UNet(x_t, t, z)``: the linear term is the exact velocity of i.i.d. Gaussian pixel noise of that
        std (:func:`cadiff.diffusion.flow.gaussian_velocity_coeff`), so the shot noise is transported
        analytically and the network learns only the structure - which a per-frame-normalized UNet renders far
        more easily than an exact per-pixel identity of the right amplitude.
        """
        v = self.decoder(x_t, t, z)
        if self.noise_std:
            t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
            shape = (-1, *([1] * (x_t.dim() - 1)))
            k_noise = gaussian_velocity_coeff(t, self.noise_std).to(v.dtype).view(shape)
            if self.noise_highpass:
                # white noise lives mostly above the cut, structure below: the low band gets the velocity of
                # unit-variance data (the normalized movie), the high band that of the pixel noise
                low = _box_blur_hw(x_t)
                k_data = gaussian_velocity_coeff(t, 1.0).to(v.dtype).view(shape)
                v = v + k_noise * (x_t - low) + k_data * low
            else:
                v = v + k_noise * x_t
        return v

    def flop_forward(self, x: Tensor) -> Tensor:
        mean, _ = self.encoder(x)
        return self.decoder(x, torch.zeros(x.shape[0], device=x.device), mean)

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Flow (or DDPM) loss of the decoder given ``z ~ q(z|x)``, plus ``kl_weight * KL``."""
        z, kl = self._latent_and_kl(x, generator)
        diffusion_loss = self.objective.loss(lambda x_t, t: self.velocity(x_t, t, z), x, generator)
        loss = diffusion_loss + self.kl_weight * kl
        metrics = {"loss": float(loss.detach()), "loss_diffusion": float(diffusion_loss.detach()),
                   "kl": float(kl.detach()), "z_std": float(z.detach().float().std())}
        return loss, metrics

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scalar training loss (the first element of :meth:`training_loss`)."""
        return self.training_loss(x, generator)[0]

    def decode(self, z: Tensor, sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Sample ``x ~ p(x | z)``: integrate from fresh noise (drawn with ``generator``) to t = 0."""
        self._check_latent(z)
        shape = (z.shape[0], *self.clip_shape_for(tuple(z.shape[1:])))
        noise = torch.randn(shape, generator=generator, device=z.device, dtype=z.dtype)
        with torch.no_grad():
            x, self.last_nfe = self.objective.sample(lambda x_t, t: self.velocity(x_t, t, z), noise, sampler,
                                                     num_steps, generator)
        return x.contiguous()


class RegressionAutoencoder(CausalAutoencoder):
    """Baseline: same encoder and UNet, decoder input fixed to ``x_t = 0, t = 0``, trained with L2 or L1."""

    def __init__(self, model_config: dict[str, Any]) -> None:
        super().__init__(model_config)
        self.regression_loss = model_config["regression_loss"]

    def _decode(self, z: Tensor) -> Tensor:
        b, _, t, h, w = z.shape
        s_t, s = self.temporal_downsample, self.spatial_downsample
        blank = z.new_zeros((b, self.in_channels, 1 + (t - 1) * s_t, h * s, w * s))
        return self.decoder(blank, z.new_zeros(b), z)

    def flop_forward(self, x: Tensor) -> Tensor:
        mean, _ = self.encoder(x)
        return self._decode(mean)

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Pixel L2 (MSE) or L1 of the deterministic reconstruction, plus ``kl_weight * KL``."""
        z, kl = self._latent_and_kl(x, generator)
        err = self._decode(z).float() - x.float()
        recon = err.pow(2).mean() if self.regression_loss == "l2" else err.abs().mean()
        loss = recon + self.kl_weight * kl
        metrics = {"loss": float(loss.detach()), "loss_recon": float(recon.detach()), "kl": float(kl.detach()),
                   "z_std": float(z.detach().float().std())}
        return loss, metrics

    def decode(self, z: Tensor, sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Deterministic reconstruction (sampler arguments are accepted and ignored)."""
        self._check_latent(z)
        with torch.no_grad():
            return self._decode(z).contiguous()
