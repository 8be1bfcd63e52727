"""`jobs/evaluate.py` end to end on tiny inputs (TIFF/HDF5 folders, a shard folder) and the set loaders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cadiff.data.simulate import simulate_movie
from cadiff.errors import DataError
from cadiff.eval.inputs import Calibration, load_set, resolve_calibration, tile_slices
from cadiff.eval.report import FIGURES, evaluate_folders
from cadiff.testing import run_job_in_process

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_movies(folder: Path, seeds, frames: int, size: int, calibration: bool, **overrides) -> list[Path]:
    """Simulated uint16 TIFF movies (source units), plus samples.json with their calibration if asked."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seed in enumerate(seeds):
        movie, truth = simulate_movie("default", frames=frames, height=size, width=size, seed=seed, **overrides)
        path = folder / f"sample_{i:03d}.tif"
        tifffile.imwrite(path, movie.data)
        paths.append(path)
    if calibration:
        record = {"gain": truth.gain, "offset": truth.offset, "read_noise": truth.read_noise, "rate_hz": movie.rate_hz}
        (folder / "samples.json").write_text(json.dumps(record))
    return paths


def run_job(*overrides: str, script: bool = False) -> subprocess.CompletedProcess:
    """The evaluate job: its script in a subprocess, or (default, no interpreter start-up) the same entry point
    in process (``cadiff.cli.run_job``: exit code and final line)."""
    if script:
        return subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), *overrides], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    return run_job_in_process("evaluate", list(overrides))


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def check_outputs(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    for name in FIGURES.values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in report
    assert (out / "report.html").read_text().count("<img src=\"data:image/png;base64,") == len(FIGURES)
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()
    assert not list(out.glob(".*tmp*")), "temp files left behind"
    return metrics


def test_evaluate_job_on_tiff_folders(tmp_path):
    gen, ref, out = tmp_path / "gen", tmp_path / "ref", tmp_path / "eval"
    write_movies(gen, [10, 11, 12, 13], frames=17, size=32, calibration=True)
    write_movies(ref, [0, 1], frames=68, size=32, calibration=False)  # calibration estimated from the movies
    proc = run_job(f"gen={gen}", f"ref={ref}", f"out={out}", "acf_lags=5", script=True)
    line = last_line(proc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert line.startswith("cadiff evaluate: ok gain_ratio=") and line.endswith(f"-> {out}")
    metrics = check_outputs(out)
    assert metrics["gen"]["num_clips"] == 4 and metrics["gen"]["calibrations"][0]["origin"] == "samples.json"
    assert metrics["ref"]["num_clips"] == 8  # two 68-frame movies tiled into 17-frame clips
    assert {c["origin"] for c in metrics["ref"]["calibrations"]} == {"estimated"}
    assert metrics["ref"]["calibrations"][0]["gain"] == pytest.approx(2.0, rel=0.1)
    assert metrics["clip_shape"] == [17, 32, 32] and metrics["rate_hz"] == pytest.approx(10.0)
    assert 0.85 <= metrics["noise"]["gain_ratio"] <= 1.15
    assert f"gain_ratio={metrics['noise']['gain_ratio']:.3f}" in line
    assert len(metrics["temporal"]["acf_gen"]) == 5


def test_evaluate_job_errors_are_one_line_naming_the_path(tmp_path):
    empty, ref = tmp_path / "empty", tmp_path / "ref"
    empty.mkdir()
    write_movies(ref, [0], frames=17, size=16, calibration=True)
    proc = run_job(f"gen={empty}", f"ref={ref}", f"out={tmp_path / 'eval'}")
    assert proc.returncode == 2
    assert last_line(proc).startswith("cadiff evaluate: error:") and str(empty) in last_line(proc)
    proc = run_job(f"gen={ref}", f"ref={ref}", f"out={tmp_path / 'eval'}", "max_clips=0")
    assert proc.returncode == 2 and "max_clips" in last_line(proc)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_unreadable_movie_raises_data_error_naming_the_file(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "sample_000.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="sample_000.tif"):
        load_set(folder)
    with pytest.raises(DataError, match="no such file"):
        load_set(tmp_path / "missing")
    (folder / "sample_000.tif").unlink()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=str(folder)):
        load_set(folder)


def test_generated_movies_borrow_the_reference_calibration_and_ref_is_tiled_to_them(tmp_path):
    gen, ref, out = tmp_path / "gen", tmp_path / "ref", tmp_path / "eval"
    write_movies(gen, [5, 6], frames=17, size=16, calibration=False)
    write_movies(ref, [0, 1], frames=34, size=32, calibration=True)
    metrics = evaluate_folders(gen, ref, out, max_clips=5, acf_lags=3)
    assert metrics["gen"]["calibrations"] == [
        {"gain": 2.0, "offset": 100.0, "read_noise": 2.0, "rate_hz": 10.0, "origin": "reference"}
    ]
    # each 34x32x32 movie gives 2 x 2 x 2 = 8 tiles of 17x16x16; a seeded sample of 5 of the 16 is kept
    assert metrics["ref"]["num_clips"] == 5 and metrics["clip_shape"] == [17, 16, 16]
    assert metrics == json.loads((out / "metrics.json").read_text())
    again = evaluate_folders(gen, ref, tmp_path / "again", max_clips=5, acf_lags=3)
    assert again["noise"] == metrics["noise"] and again["mmd"] == metrics["mmd"]


def test_clip_sets_know_the_recording_of_every_clip(tmp_path, sim_data_root):
    ref = tmp_path / "ref"
    write_movies(ref, [0, 1], frames=34, size=32, calibration=True)
    tiles = load_set(ref, max_clips=16, clip_shape=(17, 16, 16))
    assert tiles.recordings == ["sample_000.tif"] * 8 + ["sample_001.tif"] * 8
    assert load_set(ref, max_clips=16).recordings == ["sample_000.tif", "sample_001.tif"]  # whole movies
    from cadiff.data.shards import read_index

    shards = load_set(sim_data_root, split=None, max_clips=64)  # all 20 clips: 3 train + 1 val recording
    assert len(shards.recordings) == len(shards.clips) == 20
    assert set(shards.recordings) == set(read_index(sim_data_root)["sources"]) and len(set(shards.recordings)) == 4
    # evaluate splits the reference by movie: 2 movies of 8 tiles each
    metrics = evaluate_folders(ref, ref, tmp_path / "eval", max_clips=16, clip_shape=(17, 16, 16), acf_lags=3)
    assert metrics["mmd"]["baseline_unit"] == "recording" and metrics["mmd"]["baseline_recordings"] == 2
    assert "halves of its 2 recordings" in (tmp_path / "eval" / "report.md").read_text()


def test_hdf5_movies_and_calibration_fallbacks(tmp_path):
    import h5py

    folder = tmp_path / "h5"
    folder.mkdir()
    movie, truth = simulate_movie("default", frames=24, height=16, width=16, seed=2, gain=3.0)
    with h5py.File(folder / "movie.h5", "w") as fh:
        fh["frames"] = movie.data
    clip_set = load_set(folder, hdf5_key="frames", clip_shape=(8, 16, 16))
    assert clip_set.kind == "movies" and len(clip_set.clips) == 3
    assert [c.shape for c in clip_set.clips] == [(8, 16, 16)] * 3
    # a bare HDF5 dataset carries no calibration: photon transfer on the whole movie recovers it
    assert {c.origin for c in clip_set.calibrations} == {"estimated"}
    assert clip_set.calibrations[0].gain == pytest.approx(3.0, rel=0.15)
    unresolved = load_set(folder, hdf5_key="frames", estimate_missing=False)
    assert unresolved.calibrations == [None] and unresolved.clips[0].shape == (24, 16, 16)
    with pytest.raises(DataError, match="resolve_calibration"):
        unresolved.photons()
    resolved = resolve_calibration(unresolved, Calibration(2.0, 50.0, origin="index"))
    assert resolved.calibrations[0].origin == "reference" and resolved.calibrations[0].gain == 2.0
    with pytest.raises(DataError, match="movie.h5"):
        load_set(folder, hdf5_key="missing")
    photons = clip_set.photons()[0]
    assert photons.dtype == np.float32 and abs(float(photons.mean()) - float(truth.clean[:8].mean())) < 3.0


def test_tile_slices_cover_without_overlap():
    tiles = list(tile_slices((35, 20, 9), (17, 8, 100)))
    assert len(tiles) == 2 * 2 * 1
    assert tiles[0] == (slice(0, 17), slice(0, 8), slice(0, 9))
    assert tiles[-1] == (slice(17, 34), slice(8, 16), slice(0, 9))


def test_evaluate_job_with_a_shard_reference(tmp_path, sim_data_root):
    from cadiff.data.shards import read_index

    index = read_index(sim_data_root)
    gen = tmp_path / "gen"
    write_movies(gen, [40, 41, 42], frames=17, size=32, calibration=False)
    out = tmp_path / "eval"
    proc = run_job(f"gen={gen}", f"ref={sim_data_root}", f"out={out}", "ref_split=val", "max_clips=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert last_line(proc).startswith("cadiff evaluate: ok")
    metrics = check_outputs(out)
    assert metrics["ref"]["kind"] == "shards"
    expected = sum(s["count"] for s in index["splits"].get("val", {}).get("shards", [])) or sum(
        s["count"] for split in index["splits"].values() for s in split["shards"]
    )
    assert metrics["ref"]["num_clips"] == min(8, expected)
    assert {c["origin"] for c in metrics["ref"]["calibrations"]} == {"index"}
    # the generated TIFFs carry no calibration: they are read in the reference's units
    assert {c["origin"] for c in metrics["gen"]["calibrations"]} <= {"reference", "estimated", "metadata"}


def test_collapsed_generator_still_gets_a_report(tmp_path):
    """Constant outputs (a collapsed model) have no photon-transfer fit: the report says n/a instead of failing."""
    gen, ref, out = tmp_path / "gen", tmp_path / "ref", tmp_path / "eval"
    gen.mkdir()
    for i in range(3):
        tifffile.imwrite(gen / f"sample_{i:03d}.tif", np.full((17, 16, 16), 140, dtype=np.uint16))
    (gen / "samples.json").write_text(json.dumps({"gain": 2.0, "offset": 100.0, "read_noise": 2.0, "rate_hz": 10.0}))
    write_movies(ref, [0, 1], frames=34, size=16, calibration=True)
    metrics = evaluate_folders(gen, ref, out, acf_lags=3)
    assert metrics["noise"]["gain_gen"] is None and metrics["noise"]["gain_ratio"] is None
    assert metrics["intensity"]["mean_gen"] == pytest.approx(20.0)  # (140 - 100) / 2 photons
    assert metrics["mmd"]["mmd2"] > metrics["mmd"]["baseline_mmd2"]
    report = (out / "report.md").read_text()
    assert "gain ratio** (generated / reference): **n/a**" in report
    for name in FIGURES.values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_clip_size_keys_tile_both_sets(tmp_path):
    from cadiff.config import compose
    from cadiff.errors import ConfigError
    from cadiff.eval.report import evaluate_config

    gen, ref = tmp_path / "gen", tmp_path / "ref"
    write_movies(gen, [7], frames=51, size=16, calibration=True)
    write_movies(ref, [8, 9], frames=34, size=16, calibration=True)
    cfg = compose("evaluate", [f"gen={gen}", f"ref={ref}", f"out={tmp_path / 'eval'}", "clip_frames=17", "acf_lags=2"])
    metrics = evaluate_config(cfg)
    # only the frame axis is cut: 3 generated and 2 x 2 reference clips of 17 x 16 x 16
    assert (metrics["gen"]["num_clips"], metrics["ref"]["num_clips"]) == (3, 4)
    assert metrics["clip_shape"] == [17, 16, 16]
    with pytest.raises(ConfigError, match="clip_height"):
        compose("evaluate", ["clip_height=2"])
