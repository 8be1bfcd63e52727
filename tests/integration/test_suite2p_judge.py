"""`jobs/evaluate.py judge=suite2p` end to end with the real suite2p (the judge extra) on small simulated movies.

Two exports of the `default` simulator preset with different seeds stand in for a generated and a reference set:
the same process, so suite2p must find cells in both at the same density, and score well against the ground truth
of each. A set of pure-noise movies (the same camera, no cells) must be told apart: few or no ROIs, no F1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cadiff.testing import run_job_in_process

pytest.importorskip("suite2p", reason="the judge extra (make setup installs it)")

FRAMES, SIZE, MOVIES = 300, 64, 2


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s2p")
    paths = {}
    for name, seed in (("ref", 0), ("gen", 100)):
        paths[name] = root / name
        proc = run_job_in_process("export", [f"source.seed={seed}", f"source.num_movies={MOVIES}",
                                             f"source.frames={FRAMES}", f"source.height={SIZE}",
                                             f"source.width={SIZE}", "formats=[tiff]", f"out={paths[name]}"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    noise = root / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(MOVIES):  # the default preset's camera (gain 2, offset 100) on a flat field of 5 photons
        tifffile.imwrite(noise / f"noise_{i}.tif", (100 + 2 * rng.poisson(5.0, (FRAMES, SIZE, SIZE))).astype(np.uint16))
    (noise / "samples.json").write_text(json.dumps({"gain": 2.0, "offset": 100.0, "rate_hz": 30.0}))
    paths["noise"] = noise
    return paths


def evaluate(gen: Path, ref: Path, out: Path) -> dict:
    proc = run_job_in_process("evaluate", [f"gen={gen}", f"ref={ref}", f"out={out}", "judge=suite2p", "suite2p.tau=0.7"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "suite2p_rois=" in proc.stdout.strip().splitlines()[-1]
    return json.loads((out / "metrics.json").read_text())


def test_same_process_scores_alike_and_finds_the_true_cells(exports, tmp_path):
    metrics = evaluate(exports["gen"], exports["ref"], tmp_path / "ev")
    s2p = metrics["suite2p"]
    for key in ("gen", "ref"):
        truth = s2p[key]["truth"]
        assert s2p[key]["movies"] == MOVIES and s2p[key]["rois"] >= 10
        assert truth is not None and truth["f1"] >= 0.6, (key, truth)  # measured 0.73 / 0.82
    assert 0.7 <= s2p["compare"]["density_ratio"] <= 1.4
    assert s2p["compare"]["size_ks"] is not None and s2p["compare"]["snr_ks_baseline"] is not None
    out = tmp_path / "ev"
    report = (out / "report.md").read_text()
    assert "## suite2p judge" in report and "](suite2p.png)" in report
    assert (out / "suite2p.png").read_bytes()[:4] == b"\x89PNG"
    rois = np.load(out / "suite2p" / "ref" / "sim-000_rois.npz")
    assert rois["masks"].shape[1:] == (SIZE, SIZE) and len(rois["masks"]) == len(rois["snr"])
    assert "suite2p" in (out / "suite2p" / "ref" / "sim-000.log").read_text().lower()


def test_cell_free_movies_are_told_apart(exports, tmp_path):
    s2p = evaluate(exports["noise"], exports["ref"], tmp_path / "ev")["suite2p"]
    assert s2p["gen"]["truth"] is None
    assert s2p["compare"]["density_ratio"] < 0.3, s2p["compare"]  # suite2p finds (almost) nothing in noise
    assert s2p["ref"]["truth"]["f1"] >= 0.6


def test_judge_refuses_short_clips_before_running(exports, tmp_path):
    proc = run_job_in_process("evaluate", [f"gen={exports['gen']}", f"ref={exports['ref']}", f"out={tmp_path / 'x'}",
                                           "judge=suite2p", "suite2p.min_frames=500"])
    assert proc.returncode != 0
    assert "has 300 frames, expected >= 500 (suite2p.min_frames)" in proc.stdout + proc.stderr
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_a_shard_folder_reference_is_refused_before_any_metric(exports, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text("{}")  # never read: the judge refuses the folder first
    proc = run_job_in_process("evaluate", [f"gen={exports['gen']}", f"ref={shards}", f"out={tmp_path / 'x'}",
                                           "judge=suite2p"])
    assert proc.returncode != 0
    assert "is a shard folder of short clips; suite2p needs whole movies" in proc.stdout + proc.stderr
    assert not (tmp_path / "x").exists()
