"""Layers: causal convs and temporal resampling, per-frame norms, FiLM broadcast, attention with RoPE/QK-norm."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cadiff.errors import ModelError
from cadiff.models.layers import (
    Attention,
    CausalAttentionBlock3d,
    CausalConv3d,
    CausalDownsample3d,
    FrameGroupNorm,
    ResBlock3d,
    apply_rope,
    causal_time_mask,
    causal_upsample_index,
    causal_upsample_time,
    grid_coords,
    modulate,
    modulate_upsampled,
    rope_angles,
    rope_axis_dims,
    timestep_embedding,
)


def _perturb(x: torch.Tensor, frame: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = x.clone()
    y[:, :, frame] += torch.randn(y[:, :, frame].shape, generator=g)
    return y


def _changed_frames(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    return [not torch.equal(a[:, :, i], b[:, :, i]) for i in range(a.shape[2])]


def test_causal_conv_keeps_length_and_is_causal() -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, 3)
    x = torch.randn(2, 3, 9, 8, 8)
    y = conv(x)
    assert y.shape == (2, 5, 9, 8, 8)
    for j in (0, 4, 8):
        changed = _changed_frames(y, conv(_perturb(x, j)))
        assert changed[:j] == [False] * j, f"frames before {j} changed: {changed}"
        assert changed[j], f"frame {j} did not react to its own input"


def test_causal_downsample_maps_1_plus_2k_and_reads_only_past() -> None:
    torch.manual_seed(0)
    down = CausalDownsample3d(2, 4, temporal=True)
    x = torch.randn(1, 2, 9, 8, 8)
    y = down(x)
    assert y.shape == (1, 4, 5, 4, 4)
    for j in range(9):
        changed = _changed_frames(y, down(_perturb(x, j)))
        first = (j + 1) // 2  # output i reads input frames 2i-2 .. 2i
        assert changed[:first] == [False] * first
        assert changed[first]
    with pytest.raises(ModelError, match="1 \\+ 2k"):
        down(torch.randn(1, 2, 8, 8, 8))
    spatial_only = CausalDownsample3d(2, 2, temporal=False)
    assert spatial_only(x).shape == (1, 2, 9, 4, 4)


def test_causal_upsample_index_and_round_trip_lengths() -> None:
    assert causal_upsample_index(3, 4).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    z = torch.arange(5.0).view(1, 1, 5, 1, 1)
    up = causal_upsample_time(z, 4)
    assert up.shape[2] == 17
    # frame m reads latent frame ceil(m/4): never a latent frame from a later chunk
    assert up.flatten().tolist() == [math.ceil(m / 4) for m in range(17)]
    assert torch.equal(causal_upsample_time(z, 1), z)


def test_frame_group_norm_does_not_mix_time() -> None:
    torch.manual_seed(0)
    norm = FrameGroupNorm(8, num_groups=4)
    x = torch.randn(2, 8, 6, 5, 5)
    y = norm(x)
    x2 = x.clone()
    x2[:, :, 3] = 10 * x2[:, :, 3] + 7
    changed = _changed_frames(y, norm(x2))
    assert changed == [False, False, False, True, False, False]
    # per (sample, frame, group) zero mean and unit variance
    yg = y.view(2, 4, 2, 6, 5, 5)
    assert torch.allclose(yg.mean(dim=(2, 4, 5)), torch.zeros(2, 4, 6), atol=1e-5)
    assert torch.allclose(yg.var(dim=(2, 4, 5), unbiased=False), torch.ones(2, 4, 6), atol=1e-3)
    # the upstream GroupNorm over T would fail the first property
    ref = torch.nn.GroupNorm(4, 8)
    assert _changed_frames(ref(x), ref(x2))[0]


def test_frame_group_norm_in_bf16_on_cpu_matches_fp32_and_keeps_channels_last() -> None:
    """bf16 CPU frames take the NCHW path (FrameGroupNorm._norm_nchw): the values and gradients of the fp32 norm to
    bf16 precision, the output in the channels-last layout the next convolution reads."""
    torch.manual_seed(0)
    norm = FrameGroupNorm(32)  # one channel per group: the slowest case of the channels-last bf16 kernel
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 32, 3, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(2, 32, 3, 8, 8)
    ref_x = x.clone().requires_grad_(True)
    ref = norm(ref_x)
    ref.backward(g)
    ref_grads = (ref_x.grad, norm.weight.grad.clone(), norm.bias.grad.clone())
    norm.zero_grad()
    low_x = x.to(torch.bfloat16).requires_grad_(True)
    low = norm(low_x)
    assert low.dtype == torch.bfloat16 and low.is_contiguous(memory_format=torch.channels_last_3d)
    low.backward(g.to(torch.bfloat16))
    # bf16 keeps ~3 significant digits: measured max errors 0.021, 0.026, 0.14 (of up to 42), 0.05 (of up to 55)
    assert torch.allclose(low.float(), ref, atol=0.05, rtol=0.01)
    assert torch.allclose(low_x.grad.float(), ref_grads[0], atol=0.05, rtol=0.01)
    assert torch.allclose(norm.weight.grad, ref_grads[1], atol=0.3, rtol=0.01)
    assert torch.allclose(norm.bias.grad, ref_grads[2], atol=0.3, rtol=0.01)
    assert not torch.allclose(low_x.grad.float(), torch.zeros_like(ref_grads[0]))


def test_modulate_upsampled_equals_explicit_nearest_upsampling() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 8)
    shift, scale = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    up = lambda t: F.interpolate(t, scale_factor=(1, 4, 4), mode="nearest")  # noqa: E731
    assert torch.allclose(modulate_upsampled(x, shift, scale), modulate(x, up(shift), up(scale)), atol=1e-6)
    same = torch.randn(2, 3, 4, 8, 8)
    assert torch.allclose(modulate_upsampled(x, same, same), modulate(x, same, same))
    with pytest.raises(ModelError):
        modulate_upsampled(x, torch.randn(2, 3, 4, 3, 3), torch.randn(2, 3, 4, 3, 3))


def test_resblock_with_time_and_latent_conditioning_is_causal() -> None:
    torch.manual_seed(0)
    block = ResBlock3d(4, 6, temb_dim=8, cond_channels=5)
    x, temb, cond = torch.randn(1, 4, 7, 8, 8), torch.randn(1, 8), torch.randn(1, 5, 7, 2, 2)
    y = block(x, temb, cond)
    assert y.shape == (1, 6, 7, 8, 8)
    changed = _changed_frames(y, block(_perturb(x, 3), temb, cond))
    assert changed[:3] == [False] * 3 and changed[3]
    changed = _changed_frames(y, block(x, temb, _perturb(cond, 5)))
    assert changed[:5] == [False] * 5 and changed[5]
    assert not torch.equal(y, block(x, temb + 1, cond))


def test_timestep_embedding_distinguishes_times() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 500.0]), 33)
    assert emb.shape == (3, 33)
    assert torch.allclose(emb[0, :16], torch.ones(16)) and torch.allclose(emb[0, 16:32], torch.zeros(16))
    assert (emb[1] - emb[2]).abs().max() > 0.1


def test_rope_scores_depend_only_on_relative_offsets() -> None:
    torch.manual_seed(0)
    head_dim = 24
    assert sum(rope_axis_dims(head_dim)) == head_dim
    q, k = torch.randn(2, 3, 30, head_dim, dtype=torch.float64), torch.randn(2, 3, 30, head_dim, dtype=torch.float64)
    coords = torch.randint(0, 20, (30, 3))

    def scores(c: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_angles(c, head_dim, dtype=torch.float64)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    base = scores(coords)
    for offset in ([5, 0, 0], [0, 7, 0], [0, 0, 11], [123, -40, 77]):
        assert torch.allclose(scores(coords + torch.tensor(offset)), base, rtol=0, atol=1e-9), offset
    # not a no-op: moving one axis of a single token changes its scores
    moved = coords.clone()
    moved[0, 1] += 3
    assert not torch.allclose(scores(moved), base, atol=1e-3)
    # rotation keeps norms
    cos, sin = rope_angles(coords, head_dim, dtype=torch.float64)
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_attention_matches_manual_softmax_with_causal_time_mask() -> None:
    torch.manual_seed(0)
    attn = Attention(24, 2)
    frames, hw = 3, 4
    x = torch.randn(2, frames * hw, 24)
    rope = rope_angles(grid_coords(frames, 2, 2), 12)
    mask = causal_time_mask(frames, hw)
    assert mask.shape == (12, 12) and mask[4, 3] and not mask[3, 4]
    out = attn(x, rope=rope, attn_mask=mask)
    probs = attn.scores(x, rope).masked_fill(~mask, float("-inf")).softmax(-1)
    v = attn.qkv(x).view(2, 12, 3, 2, 12)[:, :, 2].transpose(1, 2)
    manual = attn.proj((probs @ v).transpose(1, 2).reshape(2, 12, 24))
    assert torch.allclose(out, manual, atol=1e-5)


def test_attention_block_is_causal_in_time() -> None:
    torch.manual_seed(0)
    block = CausalAttentionBlock3d(16, 2)
    x = torch.randn(1, 16, 5, 4, 4)
    y = block(x)
    for j in (1, 3):
        changed = _changed_frames(y, block(_perturb(x, j)))
        assert changed[:j] == [False] * j and all(changed[j:])


def test_elementwise_recompute_gives_identical_values_and_gradients() -> None:
    torch.manual_seed(0)
    fast = ResBlock3d(4, 6, temb_dim=8, cond_channels=5, recompute=False)
    lean = ResBlock3d(4, 6, temb_dim=8, cond_channels=5, recompute=True)
    lean.load_state_dict(fast.state_dict())
    x, temb, cond = torch.randn(2, 4, 5, 8, 8), torch.randn(2, 8), torch.randn(2, 5, 5, 2, 2)
    grads = []
    for block in (fast, lean):
        xi = x.clone().requires_grad_()
        out = block(xi, temb, cond)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, [p.grad for p in block.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][2], grads[1][2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


_RETAINED_PROBE = """
import ctypes, torch
from cadiff.models.layers import ResBlock3d
from cadiff.runtime.memory import set_mmap_threshold
assert set_mmap_threshold(64)  # every activation below is its own mapping, counted by mallinfo2().hblkhd
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                "keepcost".split()]
libc.mallinfo2.restype = Info
torch.manual_seed(0)
x, temb, cond = torch.randn(1, 16, 9, 32, 32), torch.randn(1, 8), torch.randn(1, 5, 9, 8, 8)
for recompute in (False, True):
    block = ResBlock3d(16, 16, temb_dim=8, cond_channels=5, recompute=recompute)
    xi = x.clone().requires_grad_()
    block(xi, temb, cond).sum().backward()  # warm-up
    before = libc.mallinfo2().hblkhd
    out = block(xi, temb, cond)
    print((libc.mallinfo2().hblkhd - before) / (x.numel() * 4))
    del out
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts glibc's mmapped bytes")
def test_elementwise_recompute_holds_two_activations_per_block() -> None:
    """What a block keeps alive from forward to backward, in activations of its input's size: without recompute
    every norm/FiLM/SiLU output and padded conv input (8.5); with it only the conv outputs, the second one shared
    with the block output by the in-place residual add (2)."""
    out = subprocess.run([sys.executable, "-c", _RETAINED_PROBE], capture_output=True, text=True, check=True)
    plain, lean = (float(v) for v in out.stdout.split())
    assert plain > 8.0
    assert lean <= 2.1, (plain, lean)


def test_elementwise_recompute_never_reruns_a_conv_in_backward() -> None:
    torch.manual_seed(0)
    x, temb, cond = torch.randn(1, 8, 9, 16, 16), torch.randn(1, 8), torch.randn(1, 5, 9, 4, 4)
    for recompute in (False, True):
        block = ResBlock3d(8, 8, temb_dim=8, cond_channels=5, recompute=recompute)
        out = block(x.clone().requires_grad_(), temb, cond)
        counter = _OpCounter()
        with counter:
            out.square().sum().backward()
        convs = [op for op in counter.ops if op in ("mkldnn_convolution", "convolution", "_convolution")]
        recomputed = {"native_group_norm", "silu"} & set(counter.ops)
        assert convs == [], f"recompute={recompute}: backward reran {convs}"
        assert bool(recomputed) == recompute, counter.ops


@pytest.mark.slow
def test_inductor_compiled_resblock_in_bf16_matches_eager_forward_and_backward(tmp_path, monkeypatch) -> None:
    """The code inductor generates for one conditioned block under bf16 autocast (what trainer.compile=blocks
    with precision=bf16 runs) gives the eager values and gradients; a fresh cache, so it really compiles."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    eager = ResBlock3d(4, 4, temb_dim=8, cond_channels=5)
    compiled = ResBlock3d(4, 4, temb_dim=8, cond_channels=5)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(dynamic=False, backend="inductor")
    x, temb, cond = torch.randn(2, 4, 5, 8, 8), torch.randn(2, 8), torch.randn(2, 5, 5, 2, 2)
    outs = []
    for block in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x, temb, cond)
        y.float().square().mean().backward()
        outs.append((y.float(), {n: p.grad.clone() for n, p in block.named_parameters()}))
    (y_eager, g_eager), (y_comp, g_comp) = outs
    assert y_comp.dtype == y_eager.dtype
    torch.testing.assert_close(y_comp, y_eager, rtol=0.05, atol=0.05)  # bf16: ~3 significant digits
    assert g_comp.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], rtol=0.1, atol=0.02, msg=name)
