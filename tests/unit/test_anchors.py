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
