"""Stage 2: a Diffusion Transformer on stage-1 latents ``[B, C, T, H, W]`` (Peebles & Xie 2023, arXiv:2212.09748).

Reads top to bottom like the reference ``models.py``: embedders, the adaLN-Zero block, the final layer, the
model, the size registry, and :class:`LatentDiffusion` (DiT + objective) that the training loop builds. Changes
from the reference: 3D patchify ``(p_t, p_h, p_w)``, 3D RoPE instead of fixed sin-cos position embeddings
(so any latent grid works), per-head QK RMSNorm, and an optional conditioning vector added to the time
embedding that drives adaLN. adaLN modulations and the output projection are zero-initialized, so the model
outputs exactly 0 at initialization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadiff.diffusion.samplers import Objective, draw_randn
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
                 cond_dim: int = 0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rope_theta = rope_theta
        self.cond_dim = cond_dim
        self.x_embedder = PatchEmbed3d(in_channels, hidden_size, self.patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.cond_embedder = nn.Linear(cond_dim, hidden_size) if cond_dim > 0 else None
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

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        grid = self.token_grid(tuple(x.shape[1:]))
        tokens = self.x_embedder(x)
        c = self.t_embedder(t.expand(x.shape[0]) if t.dim() == 0 else t)
        if cond is not None:
            if self.cond_embedder is None:
                raise ModelError("DiT got a conditioning vector but was built with cond_dim=0")
            c = c + self.cond_embedder(cond)
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
        hidden, depth, heads = self.size
        self.dit = DiT(int(model_config["in_channels"]), hidden, depth, heads, tuple(model_config["patch_size"]),
                       float(model_config["mlp_ratio"]), float(model_config["rope_theta"]),
                       int(model_config["cond_dim"]))
        self.objective = objective
        self.last_nfe = 0
        self._flops: dict[tuple[int, ...], float] = {}

    def forward(self, z: Tensor, generator: torch.Generator | None = None,
                cond: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Same as :meth:`training_loss`, so DDP/FSDP wrappers see the whole training step."""
        return self.training_loss(z, generator, cond)

    def training_loss(self, z: Tensor, generator: torch.Generator | None = None,
                      cond: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Objective loss of the DiT on a latent batch ``z [B, C, T, H, W]`` and its detached copy (no host sync)."""
        if z.dim() != 5:
            raise ModelError(f"latent batch of shape {tuple(z.shape)}: expected [B, C, T, H, W]")
        self.dit.token_grid(tuple(z.shape[1:]))
        loss = self.objective.loss(lambda x_t, t: self.dit(x_t, t, cond), z, generator)
        return loss, {"loss": loss.detach()}

    def sample(self, shape: tuple[int, ...] | list[int], sampler: str | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, cond: Tensor | None = None,
               context: Tensor | None = None) -> Tensor:
        """Draw latents of ``shape [B, C, T, H, W]`` from fresh noise (defaults from the diffusion config).

        ``context [B, C, T_c, H, W]``: the first ``T_c`` frames are given (a continuation). At every model
        evaluation they are imposed by replacement: the model sees ``noised(context, eps_c, t)`` there, with
        ``eps_c`` the same noise draw those positions start from, and the result returns ``context`` unchanged.
        Without context the noise draw and result are those of a plain sample.
        """
        if len(shape) != 5:
            raise ModelError(f"sample shape {tuple(shape)}: expected [B, C, T, H, W]")
        self.dit.token_grid(tuple(shape[1:]))
        param = next(self.parameters())
        noise = draw_randn(tuple(shape), generator, param.device, param.dtype)
        model_fn = lambda x_t, t: self.dit(x_t, t, cond)  # noqa: E731
        if context is not None:
            model_fn = self._with_context(model_fn, context.to(noise), noise, tuple(shape))
        with torch.no_grad():
            z, self.last_nfe = self.objective.sample(model_fn, noise, sampler, num_steps, generator)
        if context is not None:
            z[:, :, : context.shape[2]] = context
        return z

    def _with_context(self, model_fn: Callable[[Tensor, Tensor], Tensor], context: Tensor, noise: Tensor,
                      shape: tuple[int, ...]) -> Callable[[Tensor, Tensor], Tensor]:
        n = context.shape[2]
        if context.shape[:2] != shape[:2] or context.shape[3:] != shape[3:] or not 0 < n < shape[2]:
            raise ModelError(f"context of shape {tuple(context.shape)}: expected [B, C, T_c, H, W] matching "
                             f"{list(shape)} with 0 < T_c < {shape[2]}")
        eps_c = noise[:, :, :n].clone()

        def imposed(x_t: Tensor, t: Tensor) -> Tensor:
            x_t = x_t.clone()
            x_t[:, :, :n] = self.objective.noised(context, eps_c, t)
            return model_fn(x_t, t)

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
