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
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cadiff.data.anscombe import anscombe, cached_anscombe_moments, inverse_anscombe
from cadiff.diffusion.flow import gaussian_path_std, gaussian_velocity_coeff, path, velocity_target
from cadiff.diffusion.samplers import Objective, draw_randn
from cadiff.errors import ModelError
from cadiff.models.encoder import Encoder
from cadiff.models.layers import count_forward_flops, map_frames
from cadiff.models.unet3d import LatentUpsampler, UNet3D

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance, as in the LDM autoencoder
# :meth:`CausalAutoencoder.latent_reach`: latent frames probed, and the share of the largest window-start effect that
# still counts (ae_tiny heads trained by the generation benchmark: UNet 5-6, upsampler 17-19 latent frames)
REACH_LIMIT = 48
REACH_TOL = 1e-2


class CausalAutoencoder(nn.Module, ABC):
    """Shared parts of both stage-1 models: causal encoder, UNet decoder, shape rules, FLOPs, shard units."""

    def __init__(self, model_config: dict[str, Any], objective: Objective | None = None,
                 decoder_inputs: int | None = 1) -> None:
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
        # the decoder UNet (inputs: x_t, or x_t and the mean-head estimate); None: no such network
        self.decoder = self._build_unet(decoder_inputs) if decoder_inputs else None
        self._flops: dict[tuple[int, ...], float] = {}

    def _build_unet(self, inputs: int) -> UNet3D:
        """A decoder UNet of the configured size reading ``inputs`` channels and writing ``in_channels``."""
        cfg = self.model_config
        return UNet3D(inputs, self.z_channels, cfg["dec_base_channels"], list(cfg["dec_channel_mult"]),
                      cfg["dec_num_res_blocks"], self.temporal_downsample, self.spatial_downsample,
                      attention=bool(cfg["dec_attention"]), recompute=bool(cfg["recompute_elementwise"]),
                      out_channels=self.in_channels)

    def _build_head(self) -> UNet3D | LatentUpsampler:
        """The deterministic ``z -> clip`` decoder (``model.mean_head``): a blank-input UNet or an upsampler."""
        cfg = self.model_config
        if cfg.get("mean_head") not in ("unet", "upsampler"):
            raise ModelError(f"model.mean_head={cfg.get('mean_head')!r}: expected 'unet' or 'upsampler' (model "
                             "configs resolved by cadiff.models.registry name it)")
        if cfg["mean_head"] == "upsampler":
            return LatentUpsampler(self.z_channels, self.in_channels, cfg["dec_base_channels"],
                                   list(cfg["dec_channel_mult"]), cfg["dec_num_res_blocks"], self.temporal_downsample,
                                   self.spatial_downsample, attention=bool(cfg["dec_attention"]),
                                   recompute=bool(cfg["recompute_elementwise"]))
        return self._build_unet(self.in_channels)

    def _head_decode(self, net: UNet3D | LatentUpsampler, z: Tensor) -> Tensor:
        """``net`` run on the latent alone (a deterministic z -> clip map): an upsampler reads ``z`` only, a UNet
        gets the input ``x_t = 0`` at ``t = 0``."""
        if isinstance(net, LatentUpsampler):
            return net(z)
        b, _, t, h, w = z.shape
        s_t, s = self.temporal_downsample, self.spatial_downsample
        blank = z.new_zeros((b, net.conv_in.conv.in_channels, 1 + (t - 1) * s_t, h * s, w * s))
        return net(blank, z.new_zeros(b), z)

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
        noise = draw_randn(mean.shape, generator, mean.device, mean.dtype)
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
        nets = [self.encoder, getattr(self, "mean_decoder", None), self.decoder]
        return [b for net in nets if net is not None for b in net.res_blocks()]

    def _twin(self, model_config: dict[str, Any]) -> CausalAutoencoder:
        """A new model of this class from ``model_config`` sharing this one's objective (for FLOP counting)."""
        return type(self)(model_config) if self.objective is None else type(self)(model_config, self.objective)

    @property
    def has_signal_estimate(self) -> bool:
        """Whether :meth:`denoise` gives a noise-free estimate (every model but the ``flow``-form DiffAE)."""
        return getattr(self, "decoder_form", "mean_flow") == "mean_flow"

    @abstractmethod
    def flop_forward(self, x: Tensor) -> Tensor:
        """The forward pass whose FLOPs define the per-sample cost: encoder + one decoder evaluation."""

    @abstractmethod
    def _decoder_outputs(self, z: Tensor, x_t: Tensor) -> list[Tensor]:
        """The decoder's networks evaluated once on latent ``z`` (and ``x_t`` at flow time 1/2 where one reads it),
        each output on the clip grid: what :meth:`latent_reach` probes, network by network."""

    @torch.no_grad()
    def latent_reach(self, limit: int = REACH_LIMIT, rel_tol: float = REACH_TOL, side: int = 4) -> int | None:
        """How far a decoding window's start shows in what it decodes: the last latent frame ``r`` of a window (its
        latent frame 0 read as a lone first frame, nothing before it) whose clip frames differ from a decode of
        the whole movie by more than ``rel_tol`` of the largest such difference; None where that reaches
        ``limit`` frames. A long-movie window that decodes ``r + 1`` latent frames before the ones it keeps gives
        them as the whole movie's decode would, to that tolerance (:mod:`cadiff.inference.long_movie`).

        Measured on the current weights, not derived from the layer list (a causal conv stack's dependence decays
        geometrically long before its nominal receptive field ends; causal attention's never ends: ae_tiny at
        random weights, one thread, reaches 13 latent frames with ``dec_attention`` and without, at 1e-3 past the
        probe with it and 14 without): a probe latent of ``limit + 2`` frames on a ``side`` x ``side`` grid and
        its ``x_t`` go through one decoder evaluation whole and from latent frame 1 on. Each network of the
        decoder is judged against its own largest difference (the mean head's and the residual UNet's); a network
        whose output ignores its inputs (zero-initialized output layer) reaches 0. The UNet head normalises a
        constant field first (its blank input), which can turn multi-threaded kernels' rounding at different frame
        counts into output differences: that random-weight model measures 32 at two threads; the generation
        benchmark's trained heads measure the same at one and two."""
        param = next(self.parameters())
        gen = torch.Generator().manual_seed(0)
        s_t = self.temporal_downsample
        z = torch.randn(1, self.z_channels, limit + 2, side, side, generator=gen).to(param)  # windows: limit + 1
        x_t = torch.randn(1, *self.clip_shape_for(tuple(z.shape[1:])), generator=gen).to(param)
        was_training = self.training
        self.eval()
        try:
            # window latent frame j >= 1 is whole-movie latent frame j + 1: clip frame m >= 1 is whole frame m + s_t
            pairs = zip(self._decoder_outputs(z, x_t), self._decoder_outputs(z[:, :, 1:], x_t[:, :, s_t:]))
        finally:
            self.train(was_training)
        last = 0
        for whole, window in pairs:
            change = (window[:, :, 1:] - whole[:, :, 1 + s_t:]).float().abs().amax(dim=(0, 1, 3, 4)).cpu()
            if change.max() > 0:
                last = max(last, 1 + int((change > rel_tol * float(change.max())).nonzero().max()))
        reach = -(-last // s_t)  # window clip frame m belongs to its latent frame ceil(m / s_t)
        return None if reach >= limit else reach

    def flops_per_sample(self, input_shape: tuple[int, ...]) -> float:
        """Forward FLOPs of one training sample ``[C, T, H, W]`` (encoder + one decoder evaluation)."""
        key = tuple(int(v) for v in input_shape)
        if key not in self._flops:
            self._check_clip_shape(key)
            self._flops[key] = count_forward_flops(self.model_config, self._twin, type(self).flop_forward, key)
        return self._flops[key]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Same as :meth:`training_loss`, so DDP/FSDP wrappers see the whole training step."""
        return self.training_loss(x, generator)

    @abstractmethod
    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss on a clip batch ``x`` and detached 0-d metric tensors (no host sync; random draws honour
        ``generator``)."""

    @abstractmethod
    def probe_losses(self, x: Tensor, z: Tensor, eps: Tensor) -> dict[float | None, Tensor]:
        """Decoder losses of clips ``x`` given latent ``z`` on fixed noise ``eps``, keyed by flow time (or None)."""

    def validation_losses(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Latent-use telemetry: decoder loss with each clip's own latent and with another clip's (batch rolled).

        ``latent_use = loss(z) / loss(shuffled z)``: 1 for a decoder that ignores its latent, -> 0 as the latent
        explains more of the clip. Per-time keys ``*_t10`` .. ``*_t90`` hold the loss at flow time 0.1 .. 0.9.
        """
        z = self.encode(x)
        eps = draw_randn(x.shape, generator, x.device, x.dtype)
        out: dict[str, Tensor] = {}
        own = self.probe_losses(x, z, eps)
        out["loss_z"] = torch.stack(list(own.values())).mean()
        out.update({_t_key("loss_z", t): v for t, v in own.items()})
        if x.shape[0] >= 2:
            other = self.probe_losses(x, z.roll(1, dims=0), eps)
            out["loss_shuffled_z"] = torch.stack(list(other.values())).mean()
            out.update({_t_key("loss_shuffled_z", t): v for t, v in other.items()})
            out["latent_use"] = out["loss_z"] / out["loss_shuffled_z"].clamp_min(1e-12)
        return out

    def reconstruct(self, x: Tensor, sampler: str | None = None, num_steps: int | None = None,
                    generator: torch.Generator | None = None, sample_latent: bool = False,
                    grid: str | None = None) -> Tensor:
        """``decode(encode(x))`` (posterior mean unless ``sample_latent``)."""
        with torch.no_grad():
            z = self.encode(x, sample=sample_latent, generator=generator)
            return self.decode(z, sampler=sampler, num_steps=num_steps, generator=generator, grid=grid)

    @abstractmethod
    def decode(self, z: Tensor, sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, grid: str | None = None) -> Tensor:
        """Latent ``[B, z, T_z, H_z, W_z]`` -> clip ``[B, C, 1 + (T_z - 1) s_t, H_z s, W_z s]``."""


def _t_key(name: str, t: float | None) -> str:
    return name if t is None else f"{name}_t{round(100 * t):02d}"


def _box_blur_hw(x: Tensor) -> Tensor:
    """3x3 mean over H and W of each frame (borders averaged over the pixels inside); never mixes frames."""
    return map_frames(lambda f: torch.nn.functional.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False), x)


# photon levels of the Anscombe noise table: 0, then log-spaced up to 1e4 photons (std 1 beyond, to 1e-8)
NOISE_TABLE_PHOTONS = np.concatenate([[0.0], np.geomspace(1e-3, 1e4, 191)])
MIN_NOISE_STD = 1e-2  # normalized units: keeps k(t) finite as t -> 0 on noiseless (read-noise-free, dark) pixels
# below this typical level (photons per pixel per frame) noise_draw=auto draws photon counts: the Gaussian model's
# photon-transfer gain ratio falls to ~0.5 at 0.1-0.3 photons (benchmarks/results/ae_quality.md, Gaussian oracle)
STARVED_PHOTONS = 1.0
# photon_split: up to this read noise (photons) the counts are recovered by rounding and thinned binomially;
# above it, a Gaussian split with the same first two moments
SPLIT_COUNT_READ_NOISE = 0.3


def _interp(x: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Piecewise-linear ``ys(x)`` on the increasing grid ``xs`` (clamped to its ends)."""
    x = x.clamp(float(xs[0]), float(xs[-1])).contiguous()
    hi = torch.searchsorted(xs, x).clamp(1, len(xs) - 1)
    lo = hi - 1
    frac = (x - xs[lo]) / (xs[hi] - xs[lo]).clamp_min(1e-12)
    return ys[lo] + frac * (ys[hi] - ys[lo])


class PixelNoise(nn.Module):
    """Gaussian pixel noise around the clean signal: ``(center, std)`` (normalized units) given the mean ``mu``.

    The decoder draws ``x0 = center + std * n``. ``anscombe``: the mean head estimates ``E[f(x)]`` with ``f`` the
    generalized Anscombe transform; the photon level ``lambda`` with that expected value is found (the unbiased
    inverse, :func:`cadiff.data.noise.anscombe_moments`), and ``(center, std)`` are chosen so that the algebraic
    inverse ``f^-1(center + std n)`` has exactly the photon mean ``lambda`` and variance ``lambda + r^2`` of
    Poisson + read noise: with ``c = 3/8 + r^2``, ``P = 4 (lambda + c)``, ``Q = 4 (lambda + r^2)``,
    ``std^2 = P - sqrt(P^2 - 2Q)`` and ``center^2 = P - std^2`` (from ``E[(y/2)^2] = (m^2 + s^2) / 4`` and
    ``Var[(y/2)^2] = (m^2 s^2 + s^4 / 2) / 4`` for ``y ~ N(m, s^2)``). Bright pixels get ``std -> 1``; photon-starved
    ones the smaller spread they really have. ``photon``: ``(mu, sqrt(photons + r^2) / scale)``; ``constant``:
    ``(mu, noise_std)``.
    """

    def __init__(self, kind: str, center: float = 0.0, scale: float = 1.0, read_noise_photons: float = 0.0,
                 constant_std: float = 0.0) -> None:
        super().__init__()
        if kind not in ("anscombe", "photon", "constant"):
            raise ModelError(f"pixel noise model {kind!r}: expected 'anscombe', 'photon' or 'constant'")
        if kind != "constant" and not scale > 0:
            raise ModelError(f"pixel noise model: normalization scale {scale!r}, expected > 0")
        self.kind, self.center, self.scale = kind, float(center), float(scale)
        self.read_noise_photons, self.constant_std = float(read_noise_photons), float(constant_std)
        if kind == "anscombe":
            expected, _ = cached_anscombe_moments(tuple(NOISE_TABLE_PHOTONS), self.read_noise_photons)
            r2 = self.read_noise_photons**2
            p = 4.0 * (NOISE_TABLE_PHOTONS + 0.375 + r2)
            q = 4.0 * (NOISE_TABLE_PHOTONS + r2)
            var = p - np.sqrt(p**2 - 2.0 * q)
            for name, values in (("table_expected", expected), ("table_center", np.sqrt(p - var)),
                                 ("table_std", np.sqrt(var))):
                normalized = values / scale if name == "table_std" else (values - center) / scale
                self.register_buffer(name, torch.tensor(normalized, dtype=torch.float32), persistent=False)
            self.register_buffer("table_photons", torch.tensor(NOISE_TABLE_PHOTONS, dtype=torch.float32), False)
        # the photon level of the normalization center, the data's typical level (numpy: the model may be built
        # on the meta device, e.g. to count FLOPs)
        if kind == "anscombe":
            self.typical_photons = float(np.interp(self.center, expected, NOISE_TABLE_PHOTONS))
        else:
            self.typical_photons = max(self.center, 0.0) if kind == "photon" else float("inf")

    def photons(self, mu: Tensor) -> Tensor:
        """The photon level ``lambda`` each (normalized) signal estimate stands for (the unbiased inverse)."""
        return self.level(mu.detach())

    def level(self, mu: Tensor) -> Tensor:
        """:meth:`photons` with the gradient kept (piecewise linear in ``mu``): the photon_split mean loss."""
        mu = mu.float()
        if self.kind == "photon":
            return (mu * self.scale + self.center).clamp_min(0.0)
        if self.kind == "anscombe":
            level = _interp(mu, self.table_expected.to(mu.device), self.table_photons.to(mu.device))
            bright = mu > self.table_expected[-1]
            return torch.where(bright, ((mu * self.scale + self.center) / 2) ** 2 - 0.125 - self.read_noise_photons**2,
                               level)
        raise ModelError("a constant noise_std has no photon level: noise_draw='poisson' needs model.noise_model")

    def to_photons(self, x: Tensor) -> Tensor:
        """Photon values of normalized data ``x`` (the algebraic inverse of the normalization: counts + read noise)."""
        if self.kind == "constant":
            raise ModelError("a constant noise_std has no photon scale: mean_target='photon_split' needs "
                             "model.noise_model")
        y = x.float() * self.scale + self.center
        return inverse_anscombe(y.clamp_min(0.0), self.read_noise_photons) if self.kind == "anscombe" else y

    def from_photons(self, photons: Tensor) -> Tensor:
        """Normalized data of photon values (the normalization itself)."""
        y = anscombe(photons, self.read_noise_photons) if self.kind == "anscombe" else photons
        return (y - self.center) / self.scale

    def split(self, x: Tensor, fraction: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Two independent noisy copies of the clip ``x`` with one signal (Noise2Noise by photon thinning).

        Each detected photon goes to copy A with probability ``fraction``, else to copy B (binomial thinning of
        the counts: the copies are independent Poisson draws with rates ``fraction * lambda`` and
        ``(1 - fraction) * lambda``); the read noise is shared out in the same proportions. Returns copy A scaled
        back to the full level and normalized (what the encoder sees) and copy B in photons scaled to the full
        level (an unbiased target of ``lambda`` whose noise copy A knows nothing of). Above
        :data:`SPLIT_COUNT_READ_NOISE` photons of read noise the counts cannot be recovered by rounding, and the
        split is Gaussian with the same means and variances.
        """
        n = self.to_photons(x)
        where = generator.device if generator is not None else n.device  # a CPU generator: draw there
        if self.read_noise_photons <= SPLIT_COUNT_READ_NOISE:
            counts = n.clamp_min(0.0).round()
            rest = n - counts
            kept = torch.binomial(counts.to(where), torch.full_like(counts, fraction).to(where),
                                  generator=generator).to(n.device)
            a, b = kept + fraction * rest, counts - kept + (1.0 - fraction) * rest
        else:
            # the pixel's own value + r^2 estimates its variance lambda + r^2 without bias (clamped at 0)
            spread = (fraction * (1.0 - fraction) * (n + self.read_noise_photons**2).clamp_min(0.0)).sqrt()
            a = fraction * n + spread * draw_randn(n.shape, generator, n.device)
            b = n - a
        return self.from_photons(a / fraction).to(x.dtype), b / (1.0 - fraction)

    def draw_counts(self, mu: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Normalized clip with Poisson photon counts + Gaussian read noise around the level of ``mu``."""
        level = self.photons(mu)
        where = generator.device if generator is not None else level.device  # a CPU generator: draw there
        counts = torch.poisson(level.to(where), generator=generator).to(level.device)
        x = counts + self.read_noise_photons * draw_randn(level.shape, generator, level.device)
        return self.from_photons(x).to(mu.dtype)

    def forward(self, mu: Tensor) -> tuple[Tensor, Tensor]:
        mu = mu.detach().float()
        if self.kind == "constant":
            return mu, torch.full_like(mu, self.constant_std).clamp_min(MIN_NOISE_STD)
        if self.kind == "photon":
            photons = (mu * self.scale + self.center).clamp_min(0.0)
            return mu, ((photons + self.read_noise_photons**2).sqrt() / self.scale).clamp_min(MIN_NOISE_STD)
        m = self.table_expected.to(mu.device)
        center = _interp(mu, m, self.table_center.to(mu.device))
        std = _interp(mu, m, self.table_std.to(mu.device))
        # beyond the table (>1e4 photons) the Gaussian limit holds: center = mu, std = 1 / scale
        bright = mu > m[-1]
        center = torch.where(bright, mu, center)
        std = torch.where(bright, torch.full_like(std, 1.0 / self.scale), std)
        return center, std.clamp_min(MIN_NOISE_STD)


def pixel_noise_from_config(cfg: dict[str, Any]) -> PixelNoise | None:
    """The model's :class:`PixelNoise` from ``noise_model`` (preferred) or a constant ``noise_std``; else None."""
    nm = cfg.get("noise_model") or {}
    if nm.get("kind", "none") != "none":
        return PixelNoise(nm["kind"], nm["center"], nm["scale"], nm["read_noise_photons"])
    if cfg.get("noise_std"):
        return PixelNoise("constant", constant_std=float(cfg["noise_std"]))
    return None


def resolved_decoder_form(cfg: dict[str, Any]) -> str:
    """``decoder_form``, or its default: ``mean_flow`` for the flow objective, ``flow`` for DDPM."""
    if cfg.get("decoder_form"):
        return str(cfg["decoder_form"])
    return "mean_flow" if cfg["diffusion"]["objective"] == "flow" else "flow"


def resolved_noise_draw(cfg: dict[str, Any], pixel_noise: PixelNoise) -> str:
    """``noise_draw``, with ``auto`` resolved: ``poisson`` for photon-starved data, ``gaussian`` otherwise."""
    draw = str(cfg.get("noise_draw") or "auto")
    if draw == "auto":
        starved = pixel_noise.typical_photons < STARVED_PHOTONS
        draw = "poisson" if starved and not cfg.get("residual_unet") else "gaussian"
    if draw == "poisson" and pixel_noise.kind == "constant":
        raise ModelError("a constant noise_std has no photon level: noise_draw='poisson' needs model.noise_model")
    return draw


VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed flow times of the latent-use probe (validation telemetry)


class DiffusionAutoencoder(CausalAutoencoder):
    """Causal encoder + causal flow decoder ``p(x | z)``; decoding samples a fresh noise realization.

    ``decoder_form=mean_flow`` (default): a mean head ``mu(z)`` (a UNet that sees only ``z``) is trained with L2
    against the clip, so the latent must carry the signal, and the velocity is written around it,
    ``v = k_sigma(t) (x_t - (1 - t) c) - c + UNet(x_t - (1 - t) c, mu, t, z)``: the exact conditional velocity
    when ``x0 = c + N(0, sigma^2)``, with ``(c, sigma)`` the calibrated pixel noise around ``mu``
    (:class:`PixelNoise`; ``c = mu`` except for the photon-moment match of Anscombe data), plus an optional
    residual UNet (zero at init, ``residual_unet``) for what is neither the mean nor Gaussian noise. Decoding
    integrates the analytic part exactly (``x_t = (1 - t) c + s(t) w`` with ``dw/dt = UNet / s``), so the noise
    level does not depend on the sampler or its step count; without the residual UNet a decode is
    ``c + sigma * noise`` exactly. For photon-starved data (``noise_draw`` auto/poisson) decoding instead draws
    photon counts from the calibrated Poisson-Gaussian model around the level ``mu`` stands for: no Gaussian
    has the statistics of counts at a fraction of a photon per pixel.
    ``decoder_form=flow``: the earlier form, ``v = UNet(x_t, t, z)`` plus the homoscedastic noise term.
    """

    def __init__(self, model_config: dict[str, Any], objective: Objective) -> None:
        form = resolved_decoder_form(model_config)
        residual = bool(model_config.get("residual_unet", False))
        in_ch = int(model_config["in_channels"])
        decoder_inputs = (2 * in_ch if residual else None) if form == "mean_flow" else in_ch
        super().__init__(model_config, objective, decoder_inputs=decoder_inputs)
        self.decoder_form = form
        self.last_nfe = 0
        self.noise_std = float(model_config.get("noise_std") or 0.0)
        self.noise_highpass = bool(model_config.get("noise_highpass", False))
        self.mean_loss_weight = float(model_config.get("mean_loss_weight", 1.0))
        self.mean_target = str(model_config.get("mean_target") or "input")
        self.split_fraction = float(model_config.get("split_fraction", 0.8))
        self.pixel_noise = pixel_noise_from_config(model_config)
        # the analytic noise terms need the flow objective: a rule of the config schema (validate_autoencoder),
        # applied by the registry before any model is built
        if form == "mean_flow":
            if self.pixel_noise is None:
                raise ModelError("model.decoder_form='mean_flow' needs the pixel noise level: model.noise_model "
                                 "(filled in from the data index by the trainer) or model.noise_std")
            self.mean_decoder = self._build_head()
            self.noise_draw = resolved_noise_draw(model_config, self.pixel_noise)
            if self.mean_target == "photon_split" and self.pixel_noise.kind == "constant":
                raise ModelError("model.mean_target='photon_split' thins photon counts: it needs model.noise_model "
                                 "(photon-calibrated data), not a constant noise_std")
        elif form != "flow":
            raise ModelError(f"model.decoder_form={form!r}: expected 'mean_flow' or 'flow'")

    # the mean head ------------------------------------------------------------------------------------

    def mean(self, z: Tensor) -> Tensor:
        """Signal estimate ``mu(z) = E[x | z]`` from the latent alone (mean_flow only)."""
        return self._head_decode(self.mean_decoder, z)

    def denoise(self, z: Tensor) -> Tensor:
        """The decoder's noise-free signal estimate of latent ``z`` (same units as the clip)."""
        if self.decoder_form != "mean_flow":
            raise ModelError("decoder_form='flow' has no signal estimate: retrain with model.decoder_form=mean_flow")
        self._check_latent(z)
        with torch.no_grad():
            return self.mean(z).contiguous()

    def _mean_velocity(self, x_t: Tensor, t: Tensor, z: Tensor, mu: Tensor, noise: tuple[Tensor, Tensor]) -> Tensor:
        center, sigma = noise
        tb = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        tb = tb.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
        y = x_t - (1 - tb) * center.to(x_t.dtype)
        v = gaussian_velocity_coeff(tb, sigma).to(x_t.dtype) * y - center.to(x_t.dtype)
        if self.decoder is not None:
            v = v + self.decoder(torch.cat([y, mu], dim=1), tb.flatten(), z)
        return v

    # velocity -----------------------------------------------------------------------------------------

    def velocity(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Decoder output at ``(x_t, t)`` given the latent ``z`` (velocity for flow, eps/v for DDPM)."""
        if self.decoder_form == "mean_flow":
            mu = self.mean(z)
            return self._mean_velocity(x_t, t, z, mu, self.pixel_noise(mu))
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

    def _velocity_fn(self, z: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x_t, t) -> v`` for a fixed latent (the mean head runs once, not per evaluation)."""
        if self.decoder_form != "mean_flow":
            return lambda x_t, t: self.velocity(x_t, t, z)
        mu = self.mean(z)
        noise = self.pixel_noise(mu)
        return lambda x_t, t: self._mean_velocity(x_t, t, z, mu, noise)

    def _decoder_outputs(self, z: Tensor, x_t: Tensor) -> list[Tensor]:
        t = x_t.new_full((x_t.shape[0],), 0.5)
        if self.decoder_form != "mean_flow":
            return [self.velocity(x_t, t, z)]
        mu = self.mean(z)  # the structure, and the residual UNet apart from the analytic noise terms
        return [mu] + ([] if self.decoder is None else [self.decoder(torch.cat([x_t, mu], dim=1), t, z)])

    def flop_forward(self, x: Tensor) -> Tensor:
        mean, _ = self.encoder(x)
        if self.decoder_form == "mean_flow":
            mu = self.mean(mean)
            if self.decoder is None:
                return mu
            return self.decoder(torch.cat([x, mu], dim=1), torch.zeros(x.shape[0], device=x.device), mean)
        return self.decoder(x, torch.zeros(x.shape[0], device=x.device), mean)

    # training and validation ----------------------------------------------------------------------------

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow loss of the decoder given ``z ~ q(z|x)`` (+ ``mean_loss_weight`` * L2 of the mean head) + KL.

        ``mean_target=photon_split``: the encoder sees copy A of a photon split of ``x`` (:meth:`PixelNoise.split`)
        and the mean head learns copy B in photons (L2 over the photon variance at the data's typical level). The
        latent then gains nothing by carrying the clip's own shot noise, which the mean head would otherwise
        reproduce under the freshly drawn noise (spatially correlated excess variance at the latent block scale).
        """
        metrics: dict[str, Tensor] = {}
        if self.decoder_form == "mean_flow":
            if self.mean_target == "photon_split":
                seen, target = self.pixel_noise.split(x, self.split_fraction, generator)
                z, kl = self._latent_and_kl(seen, generator)
                mu = self.mean(z)
                floor = max(self.pixel_noise.typical_photons, 1e-3) + self.pixel_noise.read_noise_photons**2
                mean_loss = (self.pixel_noise.level(mu) - target).pow(2).mean() / floor
            else:
                z, kl = self._latent_and_kl(x, generator)
                mu = self.mean(z)
                mean_loss = (mu.float() - x.float()).pow(2).mean()
            noise = self.pixel_noise(mu)
            diffusion_loss = self.objective.loss(lambda x_t, t: self._mean_velocity(x_t, t, z, mu, noise), x, generator)
            loss = diffusion_loss + self.mean_loss_weight * mean_loss + self.kl_weight * kl
            metrics["loss_mean"] = mean_loss.detach()
        else:
            z, kl = self._latent_and_kl(x, generator)
            diffusion_loss = self.objective.loss(lambda x_t, t: self.velocity(x_t, t, z), x, generator)
            loss = diffusion_loss + self.kl_weight * kl
        metrics.update(loss=loss.detach(), loss_diffusion=diffusion_loss.detach(), kl=kl.detach(),
                       z_std=z.detach().float().std())
        return loss, metrics

    def probe_losses(self, x: Tensor, z: Tensor, eps: Tensor) -> dict[float | None, Tensor]:
        """Velocity MSE at each of :data:`VAL_TIMES` for latent ``z`` with fixed noise ``eps`` (latent-use probe)."""
        fn = self._velocity_fn(z)
        out = {}
        for t_value in VAL_TIMES:
            t = torch.full((x.shape[0],), t_value, device=x.device, dtype=x.dtype)
            pred = fn(path(x, eps, t), t)
            out[t_value] = (pred.float() - velocity_target(x, eps).float()).pow(2).mean()
        return out

    # sampling -------------------------------------------------------------------------------------------

    def decode(self, z: Tensor, sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, grid: str | None = None) -> Tensor:
        """Sample ``x ~ p(x | z)``: integrate from fresh noise (drawn with ``generator``) to t = 0 on time ``grid``."""
        self._check_latent(z)
        shape = (z.shape[0], *self.clip_shape_for(tuple(z.shape[1:])))
        noise = draw_randn(shape, generator, z.device, z.dtype)
        with torch.no_grad():
            if self.decoder_form != "mean_flow":
                x, self.last_nfe = self.objective.sample(self._velocity_fn(z), noise, sampler, num_steps, generator,
                                                         grid)
                return x.contiguous()
            mu = self.mean(z)
            if self.noise_draw == "poisson":
                self.last_nfe = 0
                return self.pixel_noise.draw_counts(mu, generator).contiguous()
            center, sigma = (v.to(z.dtype) for v in self.pixel_noise(mu))
            w = noise  # x_1 = w_1: s(1) = 1 and (1 - t) center = 0 at t = 1
            self.last_nfe = 0
            if self.decoder is not None:
                def w_velocity(w_t: Tensor, t: Tensor) -> Tensor:
                    tb = t.view(-1, *([1] * (w_t.dim() - 1)))
                    s = gaussian_path_std(tb, sigma).to(w_t.dtype)
                    return self.decoder(torch.cat([s * w_t, mu], dim=1), t, z) / s

                w, self.last_nfe = self.objective.sample(w_velocity, noise, sampler, num_steps, generator, grid)
            return (center + sigma * w).contiguous()


class RegressionAutoencoder(CausalAutoencoder):
    """Baseline: same encoder and deterministic head (``model.mean_head``: the UNet on ``x_t = 0, t = 0``, or the
    upsampler), trained with L2 or L1."""

    def __init__(self, model_config: dict[str, Any]) -> None:
        super().__init__(model_config, decoder_inputs=None)
        self.decoder = self._build_head()
        self.regression_loss = model_config["regression_loss"]

    def _decode(self, z: Tensor) -> Tensor:
        return self._head_decode(self.decoder, z)

    def probe_losses(self, x: Tensor, z: Tensor, eps: Tensor) -> dict[float | None, Tensor]:
        """The regression loss (one entry: the decoder has no flow time)."""
        err = self._decode(z).float() - x.float()
        return {None: err.pow(2).mean() if self.regression_loss == "l2" else err.abs().mean()}

    def denoise(self, z: Tensor) -> Tensor:
        """The deterministic reconstruction is the regression AE's signal estimate."""
        return self.decode(z)

    def _decoder_outputs(self, z: Tensor, x_t: Tensor) -> list[Tensor]:
        return [self._decode(z)]

    def flop_forward(self, x: Tensor) -> Tensor:
        mean, _ = self.encoder(x)
        return self._decode(mean)

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Pixel L2 (MSE) or L1 of the deterministic reconstruction, plus ``kl_weight * KL``."""
        z, kl = self._latent_and_kl(x, generator)
        err = self._decode(z).float() - x.float()
        recon = err.pow(2).mean() if self.regression_loss == "l2" else err.abs().mean()
        loss = recon + self.kl_weight * kl
        metrics = {"loss": loss.detach(), "loss_recon": recon.detach(), "kl": kl.detach(),
                   "z_std": z.detach().float().std()}
        return loss, metrics

    def decode(self, z: Tensor, sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, grid: str | None = None) -> Tensor:
        """Deterministic reconstruction (sampler arguments are accepted and ignored)."""
        self._check_latent(z)
        with torch.no_grad():
            return self._decode(z).contiguous()
