"""The step profile's grouping (benchmarks/model_step.py --profile): categories, shares, the convolutions table."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cadiff.bench import step_profile as P


def test_breakdown_groups_self_time_by_category_largest_first():
    ops = [P.OpTime("aten::convolution_backward", 600.0, 2), P.OpTime("aten::mkldnn_convolution", 200.0, 4),
           P.OpTime("aten::silu", 100.0, 3), P.OpTime("aten::addcmul", 50.0, 1), P.OpTime("aten::view", 50.0, 9)]
    rows = P.breakdown(ops)
    assert [r["category"] for r in rows] == ["conv backward", "conv forward", "activation and FiLM", "other"]
    assert [r["ms"] for r in rows] == pytest.approx([0.6, 0.2, 0.15, 0.05])
    assert sum(r["share"] for r in rows) == pytest.approx(1.0) and rows[0]["share"] == pytest.approx(0.6)
    assert rows[2]["records"] == 4 and P.category("aten::not_an_op") == "other"
    assert P.breakdown([]) == []


def test_conv_table_keeps_convolutions_only_costliest_first():
    ops = [P.OpTime("aten::mkldnn_convolution", 100.0, 2, "1x32x19x64x64 / 32x32x3x3x3"),
           P.OpTime("aten::convolution_backward", 900.0, 1, "1x32x17x64x64"), P.OpTime("aten::copy_", 5000.0, 7)]
    rows = P.conv_shapes(ops)
    assert [(r["op"], r["ms"]) for r in rows] == [("convolution_backward", 0.9), ("mkldnn_convolution", 0.1)]
    assert rows[1]["shapes"] == "1x32x19x64x64 / 32x32x3x3x3" and len(P.conv_shapes(ops, top=1)) == 1
    assert P.format_shapes([[1, 8, 5, 4, 4], [], [8, 8, 3, 3, 3], 2]) == "1x8x5x4x4 / 8x8x3x3x3"


def test_a_real_profile_of_a_conv_step_lands_in_the_conv_categories():
    conv = torch.nn.Conv3d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.nn.functional.silu(conv(x)).sum().backward()
    cats = {r["category"]: r for r in P.breakdown(P.from_profiler(prof.key_averages()))}
    assert cats["conv backward"]["ms"] > 0 and cats["conv forward"]["ms"] > 0 and cats["activation and FiLM"]["ms"] > 0
    convs = P.conv_shapes(P.from_profiler(prof.key_averages(group_by_input_shape=True)))
    assert any(r["op"] == "convolution_backward" for r in convs)
    assert any("1x4x5x8x8" in r["shapes"] for r in convs)
