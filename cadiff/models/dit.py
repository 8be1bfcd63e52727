"""Stage 2: a Diffusion Transformer on stage-1 latents ``[B, C, T, H, W]`` (Peebles & Xie 2023, arXiv:2212.09748).

Reads top to bottom like the reference ``models.py``: embedders, the adaLN-Zero block, the final layer, the
model, the size registry, and :class:`LatentDiffusion` (DiT + objective) that the training loop builds. Changes
from the reference: 3D patchify ``(p_t, p_h, p_w)``, 3D RoPE instead of fixed sin-cos position embeddings
(so any latent grid works), per-head QK RMSNorm, and an optional conditioning vector added to the time
embedding that drives adaLN. adaLN modulations and the output projection are zero-initialized, so the model
outputs exactly 0 at initialization.

Conditioning (:mod:`cadiff.data.conditioning`): an ROI map on the latent grid ``[B, H, W]`` enters as one extra
input channel (repeated over time) plus a learned given/null flag added to the time embedding; the mean photon
flux (mapped to ``[0, 1]``) is embedded like the time step, or replaced by a learned null vector. NaN marks a
condition as not given for that sample. Training drops each condition with probability ``cond_dropout`` so the
same network is also the unconditional model, and sampling mixes the two by classifier-free guidance
(Ho & Salimans 2022, arXiv:2207.12598): ``v = v_null + s (v_cond - v_null)``, ``s = guidance_scale``. The null
branch drops the guided conditions only: a condition held (``sample(guided=...)``) is given to both branches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadiff.data.conditioning import condition_width
from cadiff.diffusion.samplers import Objective, broadcast_time, draw_rand, draw_randn
from cadiff.errors import ConfigError, ModelError
from cadiff.models.layers import (
    Attention,
    TimestepEmbedder,
    count_forward_flops,
    grid_coords,
    modulate,
    rope_angles,
)


class PatchEmbed3d(nn.Module):
    """Non-overlapping ``(p_t, p_h, p_w)`` patches -> tokens ``[B, N, D]`` (raster order, t slowest)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Two-layer GELU MLP (exact erf GELU; the tanh approximation of the reference is 2x slower on CPU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: ``c`` sets shift/scale/gate of both sublayers (gates start at 0)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor], attn_mask: Tensor | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope, attn_mask=attn_mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens back to patches."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT over 3D latents: ``forward(x [B,C,T,H,W], t [B], cond [B, cond_dim] | None) -> [B,C,T,H,W]``."""

    def __init__(self, in_channels: int, hidden_size: int, depth: int, num_heads: int,
                 patch_size: tuple[int, int, int] = (1, 2, 2), mlp_ratio: float = 4.0, rope_theta: float = 10000.0,
                 cond_dim: int = 0, cond_mask: bool = False, cond_flux: bool = False, mask_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rope_theta = rope_theta
        self.cond_dim = cond_dim
        self.mask_channels = int(mask_channels) if cond_mask else 0
        self.x_embedder = PatchEmbed3d(in_channels + self.mask_channels, hidden_size, self.patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.cond_embedder = nn.Linear(cond_dim, hidden_size) if cond_dim > 0 else None
        self.mask_flag = nn.Embedding(2, hidden_size) if cond_mask else None  # row 0: no mask given, row 1: given
        self.flux_embedder = TimestepEmbedder(hidden_size) if cond_flux else None
        self.flux_null = nn.Parameter(torch.zeros(hidden_size)) if cond_flux else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialization: Xavier linears, N(0, 0.02) time MLP, zeros for every adaLN map and the output."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cond_embedder is not None:
            nn.init.normal_(self.cond_embedder.weight, std=0.02)
        if self.mask_flag is not None:
            nn.init.normal_(self.mask_flag.weight, std=0.02)
        if self.flux_embedder is not None:
            nn.init.normal_(self.flux_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.flux_embedder.mlp[2].weight, std=0.02)
            nn.init.normal_(self.flux_null, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def token_grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid ``(T/p_t, H/p_h, W/p_w)`` of a latent ``[C, T, H, W]`` (raises ModelError if not divisible)."""
        if len(shape) != 4 or shape[0] != self.in_channels:
            raise ModelError(f"DiT input shape {tuple(shape)}: expected [C={self.in_channels}, T, H, W]")
        if any(n % p for n, p in zip(shape[1:], self.patch_size)) or any(n < 1 for n in shape[1:]):
            raise ModelError(f"DiT input shape {tuple(shape)}: T, H, W must be multiples of patch_size "
                             f"{list(self.patch_size)}")
        return tuple(n // p for n, p in zip(shape[1:], self.patch_size))  # type: ignore[return-value]

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Tokens ``[B, N, p_t p_h p_w C]`` -> ``[B, C, T, H, W]``."""
        b = x.shape[0]
        gt, gh, gw = grid
        pt, ph, pw = self.patch_size
        x = x.reshape(b, gt, gh, gw, pt, ph, pw, self.in_channels)
        x = torch.einsum("bthwxyzc->bctxhywz", x)
        return x.reshape(b, self.in_channels, gt * pt, gh * ph, gw * pw)

    def _mask_input(self, x: Tensor, roi_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` with the ROI-map channel appended and the given/null flag embedding (no-op without cond_mask)."""
        if self.mask_flag is None:
            if roi_mask is not None:
                raise ModelError("DiT got an ROI mask but was built with cond_mask=false (an unconditional model)")
            return x, None
        b, _, frames, h, w = x.shape
        k = self.mask_channels
        if roi_mask is None:
            roi_mask = torch.full((b, k, h, w), math.nan, device=x.device, dtype=x.dtype)
        shape = tuple(roi_mask.shape)
        if k == 1 and roi_mask.dim() == 3:
            roi_mask = roi_mask[:, None]  # [B, H, W]: the one-plane map
        if tuple(roi_mask.shape) != (b, k, h, w):
            expected = f"[B, H, W] = {[b, h, w]}" if k == 1 else f"[B, mask_subgrid^2, H, W] = {[b, k, h, w]}"
            raise ModelError(f"ROI mask of shape {shape}: expected {expected} (the latent grid)")
        given = ~torch.isnan(roi_mask).flatten(1).any(dim=1)
        channels = torch.nan_to_num(roi_mask, nan=0.0).to(x.dtype)[:, :, None].expand(b, k, frames, h, w)
        return torch.cat([x, channels], dim=1), self.mask_flag(given.long())

    def _flux_embedding(self, flux: Tensor | None, batch: int) -> Tensor | None:
        """Embedding of the flux value ``[B]`` in ``[0, 1]`` (NaN: the learned null vector); None without cond_flux."""
        if self.flux_embedder is None:
            if flux is not None:
                raise ModelError("DiT got a flux condition but was built with cond_flux=false (an unconditional model)")
            return None
        if flux is None:
            return self.flux_null.expand(batch, -1)
        if tuple(flux.shape) != (batch,):
            raise ModelError(f"flux condition of shape {tuple(flux.shape)}: expected [B] = [{batch}]")
        given = ~torch.isnan(flux)
        embedded = self.flux_embedder(torch.nan_to_num(flux, nan=0.0))
        return torch.where(given[:, None], embedded, self.flux_null.to(embedded.dtype).expand_as(embedded))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, roi_mask: Tensor | None = None,
                flux: Tensor | None = None) -> Tensor:
        grid = self.token_grid(tuple(x.shape[1:]))
        x_in, mask_flag = self._mask_input(x, roi_mask)
        tokens = self.x_embedder(x_in)
        c = self.t_embedder(t.expand(x.shape[0]) if t.dim() == 0 else t)
        if cond is not None:
            if self.cond_embedder is None:
                raise ModelError("DiT got a conditioning vector but was built with cond_dim=0")
            c = c + self.cond_embedder(cond)
        for extra in (mask_flag, self._flux_embedding(flux, x.shape[0])):
            if extra is not None:
                c = c + extra.to(c.dtype)
        rope = rope_angles(grid_coords(*grid, device=x.device), self.hidden_size // self.num_heads,
                           self.rope_theta, torch.promote_types(tokens.dtype, torch.float32))
        for block in self.blocks:
            tokens = block(tokens, c, rope)
        return self.unpatchify(self.final_layer(tokens, c), grid)


class LatentDiffusion(nn.Module):
    """Stage-2 model: a DiT trained with the configured objective on (normalized) latents."""

    def __init__(self, model_config: dict[str, Any], objective: Objective, size: tuple[int, int, int]) -> None:
        """``size``: (hidden, depth, heads) resolved from the config's size registry (``cadiff.config.dit_size``)."""
        super().__init__()
        if not model_config.get("in_channels"):
            raise ConfigError("config key 'model.in_channels' is unset: the DiT needs the latent channel count "
                              "(recorded in the latent index)")
        self.model_config = model_config
        self.size = tuple(size)
        self.mask_subgrid = int(model_config.get("mask_subgrid") or 1)  # exports from before the key: one plane
        hidden, depth, heads = self.size
        self.dit = DiT(int(model_config["in_channels"]), hidden, depth, heads, tuple(model_config["patch_size"]),
                       float(model_config["mlp_ratio"]), float(model_config["rope_theta"]),
                       int(model_config["cond_dim"]), bool(model_config["cond_mask"]), bool(model_config["cond_flux"]),
                       condition_width("roi_mask", self.mask_subgrid))
        self.cond_dropout = float(model_config["cond_dropout"])
        # condition channels appended after the latent channels in training batches (the latent index's order)
        self.condition_names = list(model_config["conditions"] or [])
        self.objective = objective
        self.last_nfe = 0
        self._flops: dict[tuple[int, ...], float] = {}

    def forward(self, z: Tensor, generator: torch.Generator | None = None,
                cond: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Same as :meth:`training_loss`, so DDP/FSDP wrappers see the whole training step."""
        return self.training_loss(z, generator, cond)

    def split_batch(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Batch ``[B, C + K, T, H, W]`` -> latents ``[B, C, ...]`` and the conditions this model uses.

        The ``K`` channels after the latent ones are :attr:`condition_names` (``roi_mask``: an ``[H, W]`` map
        repeated over time; ``flux``: a constant); a model without that condition ignores its channel.
        """
        if x.dim() != 5:
            raise ModelError(f"latent batch of shape {tuple(x.shape)}: expected [B, C, T, H, W]")
        c = self.dit.in_channels
        widths = [condition_width(name, self.mask_subgrid) for name in self.condition_names]
        if x.shape[1] != c + sum(widths):
            raise ModelError(f"latent batch of shape {tuple(x.shape)}: expected {c} latent channels followed by the "
                             f"condition channels {self.condition_names} ({sum(widths)} channels)")
        conditions: dict[str, Tensor] = {}
        start = c
        for name, width in zip(self.condition_names, widths):
            if name == "roi_mask" and self.dit.mask_flag is not None:
                # [B, H, W] for the one-plane map, [B, mask_subgrid^2, H, W] for sub-block planes
                conditions["roi_mask"] = x[:, start, 0] if width == 1 else x[:, start:start + width, 0]
            elif name == "flux" and self.dit.flux_embedder is not None:
                conditions["flux"] = x[:, start, 0, 0, 0]
            start += width
        return x[:, :c], conditions

    def drop_conditions(self, conditions: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]:
        """Each condition of each sample replaced by NaN (not given) with probability ``cond_dropout``."""
        out = {}
        for name, value in conditions.items():
            u = draw_rand((value.shape[0],), generator, value.device)
            dropped = (u < self.cond_dropout).view(-1, *([1] * (value.dim() - 1)))
            out[name] = torch.where(dropped, torch.full_like(value, math.nan), value)
        return out

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      cond: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Objective loss of the DiT on a latent batch ``x [B, C (+ condition channels), T, H, W]``."""
        z, conditions = self.split_batch(x)
        self.dit.token_grid(tuple(z.shape[1:]))
        if self.training and self.cond_dropout > 0:
            conditions = self.drop_conditions(conditions, generator)
        loss = self.objective.loss(lambda x_t, t: self.dit(x_t, t, cond, **conditions), z, generator)
        return loss, {"loss": loss.detach()}

    def _guided(self, cond: Tensor | None, conditions: dict[str, Tensor], guidance_scale: float,
                guided: Collection[str] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """Velocity function: conditional, or classifier-free guided ``v_null + s (v_cond - v_null)``, where the
        null branch drops the ``guided`` conditions (None: all given) and keeps the others (held in both)."""
        names = set(conditions) if guided is None else set(guided) & set(conditions)
        if not names or guidance_scale == 1.0:
            return lambda x_t, t: self.dit(x_t, t, cond, **conditions)
        null = {name: torch.full_like(value, math.nan) if name in names else value
                for name, value in conditions.items()}
        if guidance_scale == 0.0:
            return lambda x_t, t: self.dit(x_t, t, cond, **null)
        both = {name: torch.cat([conditions[name], null[name]]) for name in conditions}
        cond2 = None if cond is None else torch.cat([cond, cond])

        def guided_fn(x_t: Tensor, t: Tensor) -> Tensor:
            t2 = torch.cat([t, t]) if t.dim() else t
            v_cond, v_null = self.dit(torch.cat([x_t, x_t]), t2, cond2, **both).chunk(2)
            return v_null + guidance_scale * (v_cond - v_null)

        return guided_fn

    def sample(self, shape: tuple[int, ...] | list[int], sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, cond: Tensor | None = None,
               context: Tensor | None = None, conditions: dict[str, Tensor] | None = None,
               guidance_scale: float = 1.0, context_guidance: float = 0.0,
               guided: Collection[str] | None = None) -> Tensor:
        """Draw latents of ``shape [B, C, T, H, W]`` from fresh noise (defaults from the diffusion config).

        ``context [B, C, T_c, H, W]``: the first ``T_c`` frames are given (a continuation). At every model
        evaluation they are imposed by replacement: the model sees ``noised(context, eps_c, t)`` there, with
        ``eps_c`` the same noise draw those positions start from, and the result returns ``context`` unchanged.
        Without context the noise draw and result are those of a plain sample.
        ``context_guidance`` ``w > 0`` adds reconstruction guidance (Ho et al. 2022, "Video Diffusion Models",
        arXiv:2204.03458, eq. 7): the new frames' data estimate moves by ``-(w alpha_t / 2) grad ||context -
        x0_hat[context]||^2`` (gradient in ``x_t`` of the new frames, through the model), so they agree with the
        context instead of merely sitting beside it; each model evaluation then also runs a backward pass.
        ``conditions``: ``roi_mask [B, H, W]`` and/or ``flux [B]`` (NaN: not given), guided by ``guidance_scale``
        (1: the conditional model, 0: the unconditional one). ``guided``: the conditions the guidance applies to
        (None: every given one); the others are held, given to both the conditional and the null branch - a mask
        guided at a held flux moves where the cells are without moving the brightness the mask correlates with.
        """
        if len(shape) != 5:
            raise ModelError(f"sample shape {tuple(shape)}: expected [B, C, T, H, W]")
        if not (guidance_scale >= 0 and math.isfinite(guidance_scale)):
            raise ModelError(f"guidance_scale = {guidance_scale}: expected a finite number >= 0")
        if not (context_guidance >= 0 and math.isfinite(context_guidance)):
            raise ModelError(f"context_guidance = {context_guidance}: expected a finite number >= 0")
        self.dit.token_grid(tuple(shape[1:]))
        param = next(self.parameters())
        noise = draw_randn(tuple(shape), generator, param.device, param.dtype)
        conditions = {name: value.to(device=param.device, dtype=param.dtype) for name, value in (conditions or {}).items()}
        model_fn = self._guided(cond, conditions, float(guidance_scale), guided)
        if context is not None:
            model_fn = self._with_context(model_fn, context.to(noise), noise, tuple(shape), float(context_guidance))
        with torch.no_grad():
            z, self.last_nfe = self.objective.sample(model_fn, noise, sampler, num_steps, generator)
        if context is not None:
            z[:, :, : context.shape[2]] = context
        return z

    def _with_context(self, model_fn: Callable[[Tensor, Tensor], Tensor], context: Tensor, noise: Tensor,
                      shape: tuple[int, ...], weight: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
        n = context.shape[2]
        if context.shape[:2] != shape[:2] or context.shape[3:] != shape[3:] or not 0 < n < shape[2]:
            raise ModelError(f"context of shape {tuple(context.shape)}: expected [B, C, T_c, H, W] matching "
                             f"{list(shape)} with 0 < T_c < {shape[2]}")
        eps_c = noise[:, :, :n].clone()

        def imposed(x_t: Tensor, t: Tensor) -> Tensor:
            x_t = x_t.clone()
            x_t[:, :, :n] = self.objective.noised(context, eps_c, t)
            if weight == 0.0:
                return model_fn(x_t, t)
            with torch.enable_grad():
                x_in = x_t.detach().requires_grad_(True)
                out = model_fn(x_in, t)
                error = (self.objective.predict_x0(out, x_in, t)[:, :, :n] - context).pow(2).sum()
                (grad,) = torch.autograd.grad(error, x_in)
            alpha = broadcast_time(self.objective.signal_scale(t).to(grad), grad)
            delta = -(weight / 2) * alpha * grad
            delta[:, :, :n] = 0  # the context's own estimate is not edited (it is replaced anyway)
            return self.objective.shift_x0(out.detach(), x_t, t, delta)

        return imposed

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks, the units FSDP2 shards one by one."""
        return list(self.dit.blocks)

    def flops_per_sample(self, input_shape: tuple[int, ...]) -> float:
        """Forward FLOPs of the DiT on one latent ``[C, T, H, W]`` (matmuls, convs and attention)."""
        key = tuple(int(v) for v in input_shape)
        if key not in self._flops:
            self.dit.token_grid(key)
            # on meta tensors SDPA runs its math path, so attention's QK^T and AV matmuls are counted too
            self._flops[key] = count_forward_flops(
                self.model_config, lambda cfg: LatentDiffusion(cfg, self.objective, self.size),
                lambda m, x: m.dit(x, torch.zeros(1, device=x.device)), key)
        return self._flops[key]
