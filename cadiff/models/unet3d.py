"""Causal 3D UNet: the stage-1 decoder, predicting the flow velocity of ``x_t`` given time ``t`` and latent ``z``.

The UNet keeps the full frame rate at every level and halves only H and W between its ``dec_channel_mult``
levels, so its output frame ``m`` depends on ``x_t`` frames ``<= m`` (every conv is causal, norms are per
frame, optional attention is masked causally in time). The latent enters every residual block: a small causal
conv stack embeds ``z`` on the latent grid, the result is upsampled causally in time (frame ``m`` reads latent
frame ``ceil(m / s_t)``, the latent frame whose chunk contains ``m``), and each block turns it into a per-voxel
FiLM scale/shift on its own grid (nearest upsampling by broadcast, never materialized). Hence output frame ``m``
sees latent frames ``<= ceil(m / s_t)``: the full autoencoder is causal at chunk granularity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadiff.errors import ModelError
from cadiff.models.layers import (
    CausalAttentionBlock3d,
    CausalConv3d,
    FrameGroupNorm,
    ResBlock3d,
    TimestepEmbedder,
    Upsample2x,
    act_conv,
    causal_upsample_time,
    channels_last,
)


def latent_embedder(z_channels: int, channels: int) -> nn.Sequential:
    """The small causal conv stack that embeds the latent on its own grid (the decoders' FiLM source)."""
    return nn.Sequential(CausalConv3d(z_channels, channels, 3), nn.SiLU(), CausalConv3d(channels, channels, 3))


class UNet3D(nn.Module):
    """Velocity model ``v(x_t, t, z)`` with causal convs, per-frame norms and latent FiLM at every level."""

    def __init__(self, in_channels: int, z_channels: int, base_channels: int, channel_mult: list[int],
                 num_res_blocks: int, temporal_downsample: int, spatial_downsample: int, attention: bool = False,
                 head_channels: int = 32, recompute: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        channels = [base_channels * m for m in channel_mult]
        self.temporal_downsample = temporal_downsample
        self.spatial_downsample = spatial_downsample
        self.num_levels = len(channels)
        temb_dim = 4 * base_channels
        cond_dim = channels[-1]
        self.time_embed = TimestepEmbedder(temb_dim, frequency_size=max(base_channels, 32))
        self.z_embed = latent_embedder(z_channels, cond_dim)
        self.conv_in = CausalConv3d(in_channels, channels[0], 3)

        def block(cin: int, cout: int) -> ResBlock3d:
            """A residual block conditioned on time and the latent."""
            return ResBlock3d(cin, cout, temb_dim=temb_dim, cond_channels=cond_dim, recompute=recompute)

        self.down = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels = [channels[0]]
        prev = channels[0]
        for i, ch in enumerate(channels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(block(prev, ch))
                prev = ch
                skip_channels.append(ch)
            self.down.append(blocks)
            if i < self.num_levels - 1:
                self.downsamples.append(CausalConv3d(prev, prev, 3, stride=(1, 2, 2), recompute=recompute))
                skip_channels.append(prev)
            else:
                self.downsamples.append(nn.Identity())
        self.mid1 = block(prev, prev)
        self.mid_attn = CausalAttentionBlock3d(prev, max(1, prev // head_channels)) if attention else None
        self.mid2 = block(prev, prev)
        self.up = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(self.num_levels)):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(block(prev + skip_channels.pop(), channels[i]))
                prev = channels[i]
            self.up.append(blocks)
            if i > 0:
                self.upsamples.append(Upsample2x(prev, channels[i - 1], recompute=recompute))
                prev = channels[i - 1]
            else:
                self.upsamples.append(nn.Identity())
        self.norm_out = FrameGroupNorm(prev)
        self.conv_out = CausalConv3d(prev, out_channels or in_channels, 3)
        nn.init.zeros_(self.conv_out.conv.weight)  # velocity 0 at init (ADM/DiT practice)
        nn.init.zeros_(self.conv_out.conv.bias)
        self.recompute = recompute

    def res_blocks(self) -> list[nn.Module]:
        """The repeated blocks (for FSDP2 wrapping and activation checkpointing)."""
        mid = [self.mid1] + ([self.mid_attn] if self.mid_attn is not None else []) + [self.mid2]
        return [b for lv in self.down for b in lv] + mid + [b for lv in self.up for b in lv]

    def latent_features(self, z: Tensor, frames: int) -> list[Tensor]:
        """Embedded latent per level: ``[B, C, frames, H_l', W_l']`` on the coarser of the latent/level grids."""
        feats = causal_upsample_time(self.z_embed(z), self.temporal_downsample)
        if feats.shape[2] != frames:
            raise ModelError(f"latent with {z.shape[2]} frames maps to {feats.shape[2]} frames "
                             f"(temporal_downsample={self.temporal_downsample}), but x_t has {frames}")
        per_level = []
        for level in range(self.num_levels):
            ratio = 2**level // self.spatial_downsample
            # a level coarser than the latent grid gets the latent averaged down to its own grid
            per_level.append(F.avg_pool3d(feats, (1, ratio, ratio)) if ratio > 1 else feats)
        return per_level

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        b, _, frames, height, width = x.shape
        if height % 2 ** (self.num_levels - 1) or width % 2 ** (self.num_levels - 1):
            raise ModelError(f"decoder input {height}x{width} is not divisible by 2**{self.num_levels - 1}")
        temb = self.time_embed(t.expand(b) if t.dim() == 0 else t)
        cond = self.latent_features(channels_last(z), frames)
        h = channels_last(self.conv_in(x))  # C=1 input has no channels-last layout of its own
        skips = [h]
        for level, (blocks, down) in enumerate(zip(self.down, self.downsamples)):
            for blk in blocks:
                h = blk(h, temb, cond[level])
                skips.append(h)
            if level < self.num_levels - 1:
                h = down(h)
                skips.append(h)
        h = self.mid1(h, temb, cond[-1])
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, temb, cond[-1])
        for j, (blocks, up) in enumerate(zip(self.up, self.upsamples)):
            level = self.num_levels - 1 - j
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), temb, cond[level])
            h = up(h)
        return act_conv(self._out_act, self.conv_out, h, recompute=self.recompute)

    def _out_act(self, h: Tensor) -> Tensor:
        return self.conv_out.pad(F.silu(self.norm_out(h)))


class LatentUpsampler(nn.Module):
    """Causal decoder ``z -> clip`` that only upsamples (a VAE-style decoder): a cheaper deterministic head.

    The UNet above, serving as the mean head ``mu(z)`` (or the regression decoder), runs its down path and skip
    concatenations on a blank input (``x_t = 0, t = 0``); this decoder starts from the latent instead. Level ``l``
    (``dec_channel_mult``) has ``base_channels * channel_mult[l]`` channels on the grid ``H/2^l``; the coarsest
    level starts from the embedded latent (nearest-upsampled in H, W where the latent grid is coarser), each level
    runs ``num_res_blocks + 1`` residual blocks (one more, ``mid``, at the coarsest), and ``Upsample2x`` links the
    levels. Time is doubled causally at the transitions nearest full resolution (mirroring the encoder, which
    halves it at its first levels): level ``l`` runs at ``1 + k * (s_t >> min(l, log2 s_t))`` frames, so the
    coarse levels work at the latent's frame rate. Every block is FiLM-modulated by the embedded latent on its
    own frame grid. Frame ``m`` of a finer level reads frame ``ceil(m / 2)`` of the coarser one, so output frame
    ``m`` sees latent frames ``<= ceil(m / s_t)``: the same chunk causality as the UNet's.
    """

    def __init__(self, z_channels: int, out_channels: int, base_channels: int, channel_mult: list[int],
                 num_res_blocks: int, temporal_downsample: int, spatial_downsample: int, attention: bool = False,
                 head_channels: int = 32, recompute: bool = True) -> None:
        super().__init__()
        channels = [base_channels * m for m in channel_mult]
        self.num_levels = len(channels)
        deep = self.num_levels - 1
        if 2**deep > spatial_downsample:
            raise ModelError(f"an upsampling decoder with {self.num_levels} levels needs spatial_downsample >= "
                             f"{2**deep}, got {spatial_downsample}")
        self.temporal_downsample = temporal_downsample
        self.spatial_downsample = spatial_downsample
        self.time_doublings = min(deep, int(math.log2(temporal_downsample)))
        cond_dim = channels[-1]
        self.z_embed = latent_embedder(z_channels, cond_dim)
        self.conv_in = CausalConv3d(cond_dim, channels[-1], 3)

        def block(cin: int, cout: int) -> ResBlock3d:
            """A residual block conditioned on the latent."""
            return ResBlock3d(cin, cout, cond_channels=cond_dim, recompute=recompute)

        self.mid = block(channels[-1], channels[-1])
        self.mid_attn = CausalAttentionBlock3d(channels[-1], max(1, channels[-1] // head_channels)) if attention else None
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        prev = channels[-1]
        for level in reversed(range(self.num_levels)):
            self.levels.append(nn.ModuleList(block(prev if i == 0 else channels[level], channels[level])
                                             for i in range(num_res_blocks + 1)))
            prev = channels[level]
            if level > 0:
                self.upsamples.append(Upsample2x(prev, channels[level - 1], recompute=recompute))
                prev = channels[level - 1]
        self.norm_out = FrameGroupNorm(prev)
        self.conv_out = CausalConv3d(prev, out_channels, 3)
        nn.init.zeros_(self.conv_out.conv.weight)  # the same zero start as the UNet head
        nn.init.zeros_(self.conv_out.conv.bias)
        self.recompute = recompute

    def frame_factor(self, level: int) -> int:
        """Output frames per latent frame at ``level`` (``s_t`` at full resolution)."""
        return self.temporal_downsample >> min(level, self.time_doublings)

    def res_blocks(self) -> list[nn.Module]:
        """The repeated blocks (for FSDP2 wrapping and activation checkpointing)."""
        mid = [self.mid] + ([self.mid_attn] if self.mid_attn is not None else [])
        return mid + [b for lv in self.levels for b in lv]

    def forward(self, z: Tensor) -> Tensor:
        feats = self.z_embed(channels_last(z))
        deep = self.num_levels - 1
        h = self.conv_in(causal_upsample_time(feats, self.frame_factor(deep)))
        grow = self.spatial_downsample // 2**deep  # latent grid -> the coarsest level's grid
        if grow > 1:
            h = F.interpolate(h, scale_factor=(1.0, float(grow), float(grow)), mode="nearest")
        cond = [causal_upsample_time(feats, self.frame_factor(level)) for level in range(self.num_levels)]
        h = self.mid(h, cond=cond[deep])
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        for j, blocks in enumerate(self.levels):
            level = deep - j
            for blk in blocks:
                h = blk(h, cond=cond[level])
            if level > 0:
                h = self.upsamples[j](h)
                h = causal_upsample_time(h, self.frame_factor(level - 1) // self.frame_factor(level))
        return act_conv(self._out_act, self.conv_out, h, recompute=self.recompute)

    def _out_act(self, h: Tensor) -> Tensor:
        return self.conv_out.pad(F.silu(self.norm_out(h)))
