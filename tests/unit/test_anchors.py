"""The seed-anchor normalisation of benchmarks/model_step.py (``cadiff.bench.anchors``) on synthetic anchor files."""

from __future__ import annotations

import json

import pytest

from cadiff.bench.anchors import load_anchors, normalised_speedup
from cadiff.errors import DataError


def _anchor(folder, name: str, matmul: float, steps: dict[int, float]) -> None:
    body = {"matmul": {"best_flops_per_s": matmul}, "peak_rss_mb": 2000.0,
            "steps": {f"T{t}": {"clip_shape": f"[1, 1, {t}, 64, 64]", "step_s_median": s} for t, s in steps.items()}}
    (folder / name).write_text(json.dumps(body))


def test_newest_run_per_length_and_the_normalised_speedup(tmp_path):
    _anchor(tmp_path, "upstream_step_2026-11-28_T17_T65.json", 180e9, {17: 3.5, 65: 15.0})
    _anchor(tmp_path, "upstream_step_2026-12-02_T17.json", 170e9, {17: 2.5})
    anchors = load_anchors(tmp_path)
    assert anchors[17].file == "upstream_step_2026-12-02_T17.json"  # the newest run that has T17
    assert anchors[65].file == "upstream_step_2026-11-28_T17_T65.json"  # the only run that has T65
    assert anchors[17].voxels_per_s == pytest.approx(17 * 64 * 64 / 2.5)
    # twice the seed's voxels/s on a machine whose matmul is twice as fast: no speedup at all
    assert normalised_speedup(2 * anchors[17].voxels_per_s, 2 * 170e9, anchors[17]) == pytest.approx(1.0)
    assert normalised_speedup(3 * anchors[65].voxels_per_s, 180e9, anchors[65]) == pytest.approx(3.0)


def test_missing_or_malformed_anchors_are_refused(tmp_path):
    with pytest.raises(DataError, match="anchors folder .*missing"):
        load_anchors(tmp_path / "nowhere")
    (tmp_path / "upstream_step_2026-12-02_T17.json").write_text('{"steps": {}}')
    with pytest.raises(DataError, match="matmul.best_flops_per_s"):
        load_anchors(tmp_path)


def test_model_step_summary_and_goals_use_the_normalised_speedup(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "model_step", Path(__file__).resolve().parents[2] / "benchmarks" / "model_step.py")
    model_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_step)
    _anchor(tmp_path, "upstream_step_2026-11-28_T17_T65.json", 200e9, {17: 3.4, 65: 17.0})
    anchors = load_anchors(tmp_path)

    def row(frames: int, mode: str, step_s: float, rss: float = 1.0, case: str = "diffae") -> dict:
        return {"case": case, "shape": [1, 1, frames, 64, 64], "mode": mode, "step_s": step_s,
                "voxels_per_s": frames * 64 * 64 / step_s, "matmul_gflops": 400.0, "peak_rss_gb": rss}

    # a variant of the model (the UNet mean head) is compared with the seed but is not the default:
    # it never enters the goals
    variant = [row(17, "eager", 0.1, case="diffae_unet_head"), row(65, "eager", 0.4, 0.5, case="diffae_unet_head")]
    rows = [row(17, "eager", 0.85), row(17, "compile_blocks_bf16", 0.5), row(65, "eager", 4.25, rss=2.4),
            {"case": "diffae", "shape": [1, 1, 65, 64, 64], "mode": "eager_bf16", "error": "timed out"}, *variant]
    assert model_step._speedup(variant[0], anchors) == pytest.approx(17.0)
    summary = model_step.summary(rows, anchors)
    # twice the seed's matmul rate: 4x the voxels/s is a 2.0x normalised speedup
    assert summary == {"speedup_fp32_T17": 2.0, "speedup_best_T17": 3.4, "speedup_fp32_T65": 2.0,
                       "speedup_best_T65": 2.0, "peak_rss_gb_fp32_T65": 2.4}
    goals = "\n".join(model_step.goal_lines(rows, anchors))
    assert "eager fp32, 17 frames: 2.00x (met)" in goals
    # the fastest of the modes measured, and which of the full plan's modes were not
    assert ("fastest mode (compile_blocks_bf16), 17 frames: 3.40x (met; not measured: eager_bf16, compile_model, "
            "compile_blocks, compile_model_bf16)") in goals
    assert ("fastest mode (eager), 65 frames: 2.00x (not met; not measured: eager_store, eager_glibc_malloc, "
            "eager_bf16, compile_blocks, compile_model_bf16, compile_blocks_bf16)") in goals
    full = [row(17, m, 1.0) for m in ("eager", "eager_bf16", "compile_model", "compile_blocks", "compile_model_bf16",
                                      "compile_blocks_bf16")]
    assert model_step.unmeasured_modes(full, 17) == [] and "3.0x, fastest mode (eager), 17 frames: 1.70x (not met)\n" in (
        "\n".join(model_step.goal_lines(full, anchors)) + "\n")
    assert "<= 2.0 GB: 2.40 GB (not met)" in goals
