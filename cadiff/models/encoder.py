"""Causal 3D convolutional encoder: clip ``[B, C, 1 + k*s_t, H, W]`` -> latent ``[B, z, 1 + k, H/s, W/s]``.

Level ``i`` has ``base_channels * channel_mult[i]`` channels and ``num_res_blocks`` residual blocks. Between
levels the grid is halved in H and W until ``spatial_downsample`` is reached, and in time (causally,
``1 + 2k -> 1 + k``) at the first ``log2(temporal_downsample)`` transitions. Latent frame ``i`` therefore sees
input frames ``<= s_t * i`` only: frame 0 is encoded alone, latent frame ``i >= 1`` summarizes frames
``(s_t (i-1), s_t i]`` and everything before them.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from cadiff.models.layers import (
    CausalConv3d,
    CausalDownsample3d,
    FrameGroupNorm,
    ResBlock3d,
    act_conv,
    channels_last,
)


class Encoder(nn.Module):
    """Causal conv encoder returning the posterior mean and (if ``double_z``) the log-variance."""

    def __init__(self, in_channels: int, z_channels: int, base_channels: int, channel_mult: list[int],
                 num_res_blocks: int, temporal_downsample: int, spatial_downsample: int, double_z: bool,
                 recompute: bool = True) -> None:
        super().__init__()
        channels = [base_channels * m for m in channel_mult]
        num_spatial = int(math.log2(spatial_downsample))
        num_temporal = int(math.log2(temporal_downsample))
        self.z_channels = z_channels
        self.double_z = double_z
        self.conv_in = CausalConv3d(in_channels, channels[0], 3)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3d(prev, ch, recompute=recompute))
                prev = ch
            self.levels.append(blocks)
            if i < len(channels) - 1 and i < num_spatial:
                self.downsamples.append(CausalDownsample3d(prev, prev, temporal=i < num_temporal, recompute=recompute))
            else:
                self.downsamples.append(nn.Identity())
        self.mid = ResBlock3d(prev, prev, recompute=recompute)
        self.norm_out = FrameGroupNorm(prev)
        self.conv_out = CausalConv3d(prev, 2 * z_channels if double_z else z_channels, 3)
        self.recompute = recompute

    def res_blocks(self) -> list[nn.Module]:
        """The repeated blocks (for FSDP2 wrapping and activation checkpointing)."""
        return [b for level in self.levels for b in level] + [self.mid]

    def _out_act(self, h: Tensor) -> Tensor:
        return self.conv_out.pad(F.silu(self.norm_out(h)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = channels_last(self.conv_in(x))  # C=1 input has no channels-last layout of its own
        for blocks, down in zip(self.levels, self.downsamples):
            for block in blocks:
                h = block(h)
            h = down(h)
        h = act_conv(self._out_act, self.conv_out, self.mid(h), recompute=self.recompute)
        if self.double_z:
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar
        return h, None
