"""Building blocks that keep time causal, plus the transformer pieces shared by the UNet and the DiT.

Causality contract (see DESIGN.md): along the time axis an output frame ``i`` only sees input frames ``<= i``.
Convolutions pad on the left in time only, temporal downsampling maps ``T = 1 + 2k`` to ``1 + k`` with frame 0
handled alone (as causal video VAEs do, e.g. MAGVIT-v2, arXiv:2310.05737), and every normalization computes its
statistics inside one frame (GroupNorm per frame, LayerNorm/RMSNorm per token), never across time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode

from cadiff.errors import ModelError


def _triple(value: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ModelError(f"expected an int or a (t, h, w) triple, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


_MKLDNN = torch.backends.mkldnn.is_available()
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def channels_last(x: Tensor) -> Tensor:
    """``[B, C, T, H, W]`` in channels-last-3d memory: oneDNN convs run ~1.5x faster on CPU in this layout."""
    return x.contiguous(memory_format=torch.channels_last_3d)


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= max_groups that divides ``channels`` (32 as in Wu & He 2018, arXiv:1803.08494)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def count_forward_flops(model_config: dict[str, Any], build: Callable[[dict], nn.Module],
                        run: Callable[[Any, Tensor], Any], input_shape: tuple[int, ...]) -> float:
    """FLOPs of ``run(model, x)`` for one sample, counted by ``torch.utils.flop_counter`` on meta tensors."""
    with torch.device("meta"):
        twin = build(copy.deepcopy(model_config))
        x = torch.zeros((1, *input_shape))
    with FlopCounterMode(display=False) as counter:
        run(twin, x)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------
# causal convolutions and temporal resampling


_CONV_OPS = frozenset({torch.ops.aten.mkldnn_convolution.default, torch.ops.aten.convolution.default})


def _conv_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _CONV_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_conv_outputs() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_conv_policy)


def _act_conv(fn: Callable[..., Tensor], conv: CausalConv3d, *args: Tensor | None) -> Tensor:
    return conv.conv_padded(fn(*args))


def act_conv(fn: Callable[..., Tensor], conv: CausalConv3d, *args: Tensor | None, recompute: bool) -> Tensor:
    """``conv.conv_padded(fn(*args))`` where ``fn`` is cheap and elementwise (norm, FiLM, SiLU, the causal pad).

    With ``recompute`` (and grad enabled) the pair runs as a selective checkpoint: the conv's output is kept
    (MUST_SAVE, so backward never reruns the conv) and ``fn``'s output, the conv's input, is not held from
    forward to backward but recomputed from ``args``, which are usually held anyway (a block's input, the
    previous conv's output). Values and gradients are those of the plain composition.
    """
    if recompute and torch.is_grad_enabled():
        return checkpoint(_act_conv, fn, conv, *args, use_reentrant=False, preserve_rng_state=False,
                          context_fn=_keep_conv_outputs)
    return _act_conv(fn, conv, *args)


class CausalConv3d(nn.Module):
    """Conv3d padded by ``k_t - 1`` zero frames on the left only, so output frame i sees input frames <= i."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
                 stride: int | tuple[int, int, int] = 1, bias: bool = True, recompute: bool = False) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        self.time_pad = kt - 1
        self.recompute = recompute  # backward re-pads the input instead of keeping the padded copy (act_conv)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=_triple(stride),
                              padding=(0, kh // 2, kw // 2), bias=bias)

    def pad(self, x: Tensor) -> Tensor:
        """Prepend the ``k_t - 1`` zero frames (separate so callers can recompute it with the activation)."""
        return F.pad(x, (0, 0, 0, 0, self.time_pad, 0)) if self.time_pad else x

    def conv_padded(self, x: Tensor) -> Tensor:
        """The convolution of an already time-padded input."""
        if (_MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu")):
            # PyTorch sends small batch-1 CPU convs to its im2col fallback (a size heuristic in Convolution.cpp);
            # calling oneDNN directly is several times faster there and identical in value and gradient
            c = self.conv
            return torch.ops.aten.mkldnn_convolution(x, c.weight, c.bias, list(c.padding), list(c.stride),
                                                     list(c.dilation), c.groups)
        return self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        return act_conv(self.pad, self, x, recompute=self.recompute and self.time_pad > 0)


class CausalDownsample3d(nn.Module):
    """Stride-2 causal conv: ``T = 1 + 2k -> 1 + k`` (frame 0 alone, then pairs) when ``temporal``, H, W halved."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, spatial: bool = True,
                 recompute: bool = False) -> None:
        super().__init__()
        # kernel 3 with 2 left pad frames: output frame i reads input frames 2i-2, 2i-1, 2i
        self.conv = CausalConv3d(in_channels, out_channels, 3, stride=(2 if temporal else 1, 2 if spatial else 1,
                                                                        2 if spatial else 1), recompute=recompute)
        self.temporal = temporal

    def forward(self, x: Tensor) -> Tensor:
        if self.temporal and x.shape[2] % 2 != 1:
            raise ModelError(f"causal temporal downsampling needs T = 1 + 2k frames, got T = {x.shape[2]}")
        return self.conv(x)


def causal_upsample_index(latent_frames: int, factor: int, device: torch.device | None = None) -> Tensor:
    """Frame index map of the causal temporal upsampling ``1 + k -> 1 + k*factor``: frame m reads ceil(m/factor)."""
    frames = 1 + (latent_frames - 1) * factor
    m = torch.arange(frames, device=device)
    return torch.div(m + factor - 1, factor, rounding_mode="floor")


def causal_upsample_time(x: Tensor, factor: int) -> Tensor:
    """Repeat latent frames causally along dim 2: frame 0 stays alone, latent frame i covers frames (f(i-1), f i]."""
    if factor == 1:
        return x
    return x.index_select(2, causal_upsample_index(x.shape[2], factor, x.device))


class Upsample2x(nn.Module):
    """Causal 3x3x3 conv on the coarse grid, then nearest-neighbour 2x in H and W (frame rate unchanged).

    Convolving before upsampling costs a quarter of the usual upsample-then-conv (ADM, LDM), and mapping to the
    finer level's (fewer) channels halves it again; the next residual block's convs smooth the nearest copy.
    """

    def __init__(self, in_channels: int, out_channels: int, recompute: bool = False) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, 3, recompute=recompute)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(x), scale_factor=(1.0, 2.0, 2.0), mode="nearest")


# ---------------------------------------------------------------------------------------------------------
# normalization and modulation


class FrameGroupNorm(nn.Module):
    """GroupNorm whose statistics are taken per frame (over channel groups x H x W), never across time.

    Upstream applied ``nn.GroupNorm`` to ``[B, C, T, H, W]``, which pools statistics over T and lets the future
    leak into the past; here each (batch, frame, group) is normalized on its own.
    """

    def __init__(self, channels: int, num_groups: int | None = None, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.num_groups = num_groups or num_groups_for(channels)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None
        if channels % self.num_groups:
            raise ModelError(f"FrameGroupNorm: {channels} channels are not divisible into {self.num_groups} groups")

    def forward(self, x: Tensor) -> Tensor:
        low_precision_cpu = x.device.type == "cpu" and x.dtype in _LOW_PRECISION
        return map_frames(self._norm_nchw if low_precision_cpu else self._norm, x)

    def _norm(self, frames: Tensor) -> Tensor:
        return F.group_norm(frames, self.num_groups, self.weight, self.bias, self.eps)

    def _norm_nchw(self, frames: Tensor) -> Tensor:
        """Group norm of bf16/fp16 CPU frames computed on an NCHW copy, returned channels-last.

        PyTorch's CPU group-norm backward in bf16 is 5-25x slower on channels-last frames than on NCHW ones
        (32-256 channels, 8-64 px: 54 against 2 ms for 17x32x64x64); with the two layout copies a bf16
        ``ae_default`` step at 17 frames takes 0.73 instead of 0.91 s. In fp32 the copies cost more than they
        save (1.72-1.78 against 1.67 s), so fp32 stays as it is.
        """
        return self._norm(frames.contiguous()).contiguous(memory_format=torch.channels_last)


def map_frames(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 2D op ``fn`` to every frame of ``[B, C, T, H, W]`` alone (frames as batch entries: never mixes time).

    ``[B, C, T, H, W] -> [B*T, C, H, W]`` is a view (no copy) for channels-last-3d input; ``fn`` keeps C, H, W.
    """
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, c, h, w).transpose(1, 2)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN scale-shift ``x * (1 + scale) + shift`` (Perez et al. 2018 FiLM; Peebles & Xie 2023 DiT)."""
    return torch.addcmul(shift, x, 1 + scale)


def modulate_upsampled(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """FiLM with per-voxel ``shift``/``scale`` given at a coarser spatial grid, broadcast by nearest upsampling.

    ``x`` is ``[B, C, T, H, W]`` and ``shift``/``scale`` are ``[B, C, T, H/f, W/f]``: the maps are never
    materialized at full resolution (views with size-1 axes broadcast instead), which keeps the latent injection
    of the decoder UNet as cheap as one elementwise pass.
    """
    b, c, t, h, w = x.shape
    hz, wz = shift.shape[-2:]
    if h % hz or w % wz or h // hz != w // wz:
        raise ModelError(f"conditioning grid {hz}x{wz} does not divide the feature grid {h}x{w}")
    f = h // hz
    if f == 1:
        return modulate(x, shift, scale)
    xv = x.reshape(b, c, t, hz, f, wz, f)
    out = torch.addcmul(shift.reshape(b, c, t, hz, 1, wz, 1), xv, 1 + scale.reshape(b, c, t, hz, 1, wz, 1))
    return out.reshape(b, c, t, h, w)


# ---------------------------------------------------------------------------------------------------------
# timestep embedding


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` (any real, e.g. 1000 * flow time) as in Vaswani et al. 2017 / DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Flow time ``t in [0, 1]`` -> vector: sinusoids of ``1000 t`` (the DDPM step scale) then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(1000.0 * t, self.frequency_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ---------------------------------------------------------------------------------------------------------
# rotary position embedding in 3D


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an even head dimension over (t, h, w): h and w get 2*floor(d/6) each, t the (even) rest."""
    if head_dim % 2 or head_dim < 6:
        raise ModelError(f"3D RoPE needs an even head dimension >= 6, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def grid_coords(frames: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Integer (t, h, w) coordinates of a token grid in raster order (t slowest), shape ``[T*H*W, 3]``."""
    t, h, w = torch.meshgrid(torch.arange(frames, device=device), torch.arange(height, device=device),
                             torch.arange(width, device=device), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=-1)


def rope_angles(coords: Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
                ) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[N, head_dim/2]`` for 3D RoPE (Su et al. 2021, arXiv:2104.09864), one band per axis.

    Each axis ``a`` with ``d_a`` dims rotates ``d_a/2`` pairs at frequencies ``theta^(-2i/d_a)``; the tables are
    computed in float64 so large positions keep their phase accuracy.
    """
    angles = []
    for axis, d_axis in enumerate(rope_axis_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, d_axis, 2, device=coords.device, dtype=torch.float64) / d_axis)
        angles.append(coords[:, axis].to(torch.float64)[:, None] * freqs[None])
    ang = torch.cat(angles, dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [..., N, D]`` by the angles ``[N, D/2]`` (half-split pairs: dims i and i + D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    # tables may be wider (fp32 under bf16 autocast): rotate in the wider type, return x's dtype
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def causal_time_mask(frames: int, tokens_per_frame: int, device: torch.device | None = None) -> Tensor:
    """Boolean ``[N, N]`` mask (True = may attend): a token of frame i attends to tokens of frames <= i."""
    frame = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame)
    return frame[:, None] >= frame[None, :]


# ---------------------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """Multi-head self-attention with per-head QK RMSNorm (Dehghani et al. 2023, arXiv:2302.05442) and RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def _qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def scores(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Pre-softmax logits ``q k^T / sqrt(d)`` of shape ``[B, heads, N, N]`` (diagnostics and tests)."""
        q, k, _ = self._qkv(x, rope)
        return q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self._qkv(x, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


# ---------------------------------------------------------------------------------------------------------
# residual blocks


class ResBlock3d(nn.Module):
    """Causal residual block: norm-SiLU-conv twice, FiLM-modulated by a time vector and a latent feature map.

    ``temb_dim`` adds a per-channel scale/shift from the time embedding; ``cond_channels`` adds a per-voxel
    scale/shift from conditioning features given at a coarser spatial grid with the block's frame count
    (the stage-1 latent, already causally upsampled in time), applied by :func:`modulate_upsampled`.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int | None = None,
                 cond_channels: int | None = None, recompute: bool = True) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = FrameGroupNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.temb_proj = nn.Linear(temb_dim, 2 * out_channels) if temb_dim else None
        self.cond_proj = nn.Conv3d(cond_channels, 2 * out_channels, 1) if cond_channels else None
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.recompute = recompute

    def _act1(self, x: Tensor) -> Tensor:
        return self.conv1.pad(F.silu(self.norm1(x)))

    def _act2(self, h: Tensor, shift: Tensor | None, scale: Tensor | None) -> Tensor:
        h = self.norm2(h)
        if self.cond_proj is not None:
            h = modulate_upsampled(h, shift, scale)
        elif shift is not None:
            h = modulate(h, shift, scale)
        return self.conv2.pad(F.silu(h))

    def forward(self, x: Tensor, temb: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        # selective recomputation (act_conv): backward recomputes norm/FiLM/SiLU/pad from each segment's input
        # instead of keeping their outputs and the padded conv input; conv outputs are kept, so no conv runs twice
        h = act_conv(self._act1, self.conv1, x, recompute=self.recompute)
        shift = scale = None
        if self.temb_proj is not None:
            shift, scale = self.temb_proj(F.silu(temb))[:, :, None, None, None].chunk(2, dim=1)
        if self.cond_proj is not None:
            # 1x1 conv commutes with nearest upsampling, so it runs on the coarse grid
            shift_c, scale_c = self.cond_proj(cond).chunk(2, dim=1)
            shift = shift_c if shift is None else shift_c + shift
            scale = scale_c if scale is None else scale_c + scale
        h = act_conv(self._act2, self.conv2, h, shift, scale, recompute=self.recompute)
        skip = self.skip(x)
        if self.recompute and torch.is_grad_enabled() and skip.dtype == h.dtype:
            # in place into the conv output, which the selective checkpoint keeps anyway: the block output shares
            # its storage instead of holding a second full-size map (under autocast a bf16 conv output plus an fp32
            # skip promotes to fp32, so that case adds out of place)
            return h.add_(skip)
        return skip + h


class CausalAttentionBlock3d(nn.Module):
    """Residual self-attention over all (t, h, w) tokens of a feature map, masked causally in time, 3D RoPE."""

    def __init__(self, channels: int, num_heads: int, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)  # per token: never mixes frames
        self.attn = Attention(channels, num_heads)
        self.rope_theta = rope_theta

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        rope = rope_angles(grid_coords(t, h, w, x.device), self.attn.head_dim, self.rope_theta,
                           torch.promote_types(x.dtype, torch.float32))
        mask = causal_time_mask(t, h * w, x.device)
        out = self.attn(self.norm(tokens), rope=rope, attn_mask=mask)
        return x + out.transpose(1, 2).reshape(b, c, t, h, w)
