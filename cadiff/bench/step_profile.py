"""Where a training step's time goes: the profiler's self CPU time per op, grouped into a few categories.

``benchmarks/model_step.py --profile`` runs one eager step of the default DiffAE under ``torch.profiler`` and
writes the breakdown (``model_step_profile.md``): how much of the step the convolutions take (forward and
backward, by layer shape), how much the memory-bound norm/activation/FiLM passes and the copies around them. It
answers whether a faster step needs fewer FLOPs or leaner code around them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# aten op name -> category; anything else is "other" (autograd bookkeeping, views, small ops)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "conv backward": ("aten::convolution_backward",),
    "conv forward": ("aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::_slow_conv2d_forward",
                     "aten::cudnn_convolution", "aten::_convolution"),
    "norm": ("aten::native_group_norm", "aten::native_group_norm_backward", "aten::native_layer_norm",
             "aten::native_layer_norm_backward", "aten::_fused_rms_norm", "aten::_fused_rms_norm_backward"),
    "activation and FiLM": ("aten::silu", "aten::silu_backward", "aten::addcmul", "aten::mul", "aten::add",
                            "aten::add_", "aten::sub", "aten::div", "aten::sum", "aten::mean", "aten::pow",
                            "aten::exp", "aten::neg", "aten::where"),
    "copies and padding": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::constant_pad_nd",
                           "aten::index_select", "aten::upsample_nearest3d", "aten::upsample_nearest3d_backward"),
    "attention and matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                             "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
}
_CATEGORY_OF = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
CONV_OPS = frozenset(CATEGORIES["conv backward"] + CATEGORIES["conv forward"])


@dataclass(frozen=True)
class OpTime:
    """One profiled op (or op and input shapes): its name, self CPU time in microseconds, the profiler's record
    count (see :func:`breakdown`), input shapes."""

    name: str
    self_us: float
    calls: int
    shapes: str = ""


def category(name: str) -> str:
    """The category of an aten op name (``other`` when it is none of :data:`CATEGORIES`)."""
    return _CATEGORY_OF.get(name, "other")


def breakdown(ops: Iterable[OpTime]) -> list[dict]:
    """Self time per category, largest first: ``{"category", "ms", "share", "records"}`` (share of the total).

    Records are the profiler's: an op run inside a selective-recompute checkpoint is recorded again by the
    checkpoint's dispatch mode (and where backward fetches its kept output), so counts can exceed the calls; the
    self times are not counted twice (a record's self time excludes the records inside it)."""
    totals: dict[str, list[float]] = {}
    for op in ops:
        entry = totals.setdefault(category(op.name), [0.0, 0])
        entry[0] += op.self_us
        entry[1] += op.calls
    whole = sum(v[0] for v in totals.values()) or 1.0
    rows = [{"category": cat, "ms": us / 1e3, "share": us / whole, "records": int(calls)}
            for cat, (us, calls) in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def conv_shapes(ops: Iterable[OpTime], top: int = 12) -> list[dict]:
    """The costliest convolutions by op and input shapes (from a shape-grouped profile), largest first."""
    rows = [{"op": op.name.removeprefix("aten::"), "shapes": op.shapes, "records": op.calls, "ms": op.self_us / 1e3}
            for op in ops if op.name in CONV_OPS]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def from_profiler(events: Iterable) -> list[OpTime]:
    """``OpTime`` rows of ``torch.profiler`` key averages (``prof.key_averages(group_by_input_shape=...)``)."""
    return [OpTime(e.key, float(e.self_cpu_time_total), int(e.count), format_shapes(getattr(e, "input_shapes", None)))
            for e in events]


def format_shapes(shapes: list | None) -> str:
    """The tensor shapes of an op's inputs, ``1x32x19x64x64 / 32x32x3x3x3`` (scalar and empty arguments left out)."""
    return " / ".join("x".join(map(str, s)) for s in (shapes or []) if isinstance(s, (list, tuple)) and s)
