"""prepare_data: counts, split by recording (or time), calibration, resume, CLI contract, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from cadiff.config import compose
from cadiff.data.movie import normalize
from cadiff.data.prepare import prepare_data
from cadiff.data.shards import iter_shard, read_index
from cadiff.data.simulate import simulate_movie
from cadiff.errors import ConfigError, DataError
from cadiff.testing.data import prepare_sim

REPO = Path(__file__).resolve().parents[2]


def _clips(root, split):
    index = read_index(root)
    return [s for sh in index["splits"][split]["shards"] for s in iter_shard(root / sh["path"], "clips")]


def test_sim_data_split_by_recording_and_calibrated(sim_data_root):
    index = read_index(sim_data_root)
    assert index["clip_shape"] == [17, 32, 32] and index["dtype"] == "uint16" and index["split_by"] == "recording"
    assert index["splits"]["train"]["num_clips"] == 15 and index["splits"]["val"]["num_clips"] == 5
    train, val = _clips(sim_data_root, "train"), _clips(sim_data_root, "val")
    train_recs, val_recs = {m["recording"] for _, _, m in train}, {m["recording"] for _, _, m in val}
    assert len(train_recs) == 3 and len(val_recs) == 1 and not train_recs & val_recs
    assert all(a.dtype == np.uint16 and a.shape == (17, 32, 32) for _, a, _ in train + val)
    for calib in index["sources"].values():
        assert calib["gain"] == pytest.approx(calib["true_gain"], rel=0.1)
    norm = index["normalization"]
    x = np.concatenate([normalize(a, index["sources"][m["source"]], norm).ravel() for _, a, m in train])
    assert abs(x.mean()) < 1e-3 and x.std() == pytest.approx(1.0, rel=1e-3)


def test_rerun_is_a_no_op_and_changed_config_rewrites(tmp_path):
    root = tmp_path / "d"
    first = prepare_sim(root)
    shard = root / "train" / "clips-000000.tar"
    stamp = shard.stat().st_mtime_ns
    assert prepare_sim(root) == first
    assert shard.stat().st_mtime_ns == stamp
    (root / "index.json").unlink()  # an interrupted run: shards there, no index
    assert prepare_sim(root)["num_train"] == first["num_train"]
    assert shard.stat().st_mtime_ns == stamp  # finished shards were skipped
    changed = prepare_sim(root, "clips_per_shard=8")
    assert changed["num_train"] == first["num_train"]
    assert sorted(p.name for p in (root / "train").iterdir()) == ["clips-000000.tar", "clips-000001.tar"]


def test_single_recording_is_split_in_time_without_overlap(tmp_path):
    summary = prepare_sim(tmp_path / "one", "source.num_movies=1", "source.frames=170")
    index = read_index(tmp_path / "one")
    assert index["split_by"] == "time" and summary["num_train"] == 7 and summary["num_val"] == 2
    train_end = max(m["t0"] for _, _, m in _clips(tmp_path / "one", "train")) + 17
    val_start = min(m["t0"] for _, _, m in _clips(tmp_path / "one", "val"))
    assert train_end <= val_start == index["splits"]["val"]["frame_ranges"]["sim-000"][0]


def test_cli_tiff_source_contract(tmp_path):
    movie, _ = simulate_movie(frames=120, height=64, width=64, seed=7)
    tifffile.imwrite(tmp_path / "movie.tif", movie.data)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "jobs" / "prepare_data.py"), "source=tiff", f"source.path={tmp_path / 'movie.tif'}",
           f"out={out}", "clip.frames=17", "clip.height=64", "clip.width=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"cadiff prepare_data: ok 5 train / 1 val clips 17x64x64 -> {out}"
    index = read_index(out)
    assert index["sources"]["movie"]["gain"] == pytest.approx(2.0, rel=0.05)
    bad = subprocess.run([*cmd[:3], f"source.path={tmp_path / 'nope.tif'}", f"out={tmp_path / 'o2'}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout.strip().startswith("cadiff prepare_data: error:")
    assert "nope.tif" in bad.stdout


def test_hdf5_folder_with_given_calibration(tmp_path):
    for i in range(3):
        movie, _ = simulate_movie(frames=40, height=32, width=32, seed=i)
        with h5py.File(tmp_path / f"rec{i}.h5", "w") as f:
            f["mov"] = movie.data
            if i == 0:
                f["mov"].attrs["pixel_size_um"] = 0.78  # carried into index.json for the TIFFs sample writes
    cfg = compose("prepare_data", ["source=hdf5", f"source.path={tmp_path}", "source.key=mov", "source.gain=2.0",
                                   "source.offset=100", "source.read_noise=2", f"out={tmp_path / 'out'}",
                                   "clip.frames=17", "clip.height=32", "clip.width=32", "normalization.kind=anscombe"])
    summary = prepare_data(cfg)
    index = read_index(tmp_path / "out")
    assert summary["num_recordings"] == 3 and summary["num_train"] == 4 and summary["num_val"] == 2
    assert all(s["calibration"] == "given" and s["read_noise"] == 2.0 for s in index["sources"].values())
    assert {k: s.get("pixel_size_um") for k, s in index["sources"].items()} == {"rec0": 0.78, "rec1": None, "rec2": None}
    assert index["normalization"]["kind"] == "anscombe"


def test_real_allen_sample_keeps_int16(tmp_path, real_data_dir):
    cfg = compose("prepare_data", ["source=hdf5", f"source.path={real_data_dir / '792757260_test_data.h5'}",
                                   "source.key=input_frames", f"out={tmp_path / 'allen'}", "clip.frames=17",
                                   "clip.height=32", "clip.width=32"])
    summary = prepare_data(cfg)
    assert summary["dtype"] == "int16" and summary["num_train"] > 0 and summary["num_val"] > 0
    calib = read_index(tmp_path / "allen")["sources"]["792757260_test_data"]
    assert calib["photon_transfer"]["method"] == "dark" and 350 < calib["gain"] < 700


@pytest.mark.parametrize("case", ["short", "nan_calibration", "nan_tiling", "image", "empty"])
def test_bad_input_names_file_and_leaves_nothing(tmp_path, case):
    path = tmp_path / "in.tif"
    data = simulate_movie(frames=60, height=32, width=32, seed=0)[0].data
    if case == "short":
        tifffile.imwrite(path, data[:10])
        match = r"in.tif: movie \(10, 32, 32\) is smaller than one clip"
    elif case.startswith("nan"):
        bad = data.astype(np.float32)
        # calibration reads frames 0-7 and 48-55 (calibration_frames=16); tiling reads 0-50
        bad[50 if case == "nan_calibration" else 30, 3, 3] = np.nan
        tifffile.imwrite(path, bad)
        match = r"in.tif: noise calibration failed.*NaN" if case == "nan_calibration" else r"in.tif: frame 30 contains NaN"
    elif case == "image":
        tifffile.imwrite(path, data[0])
        match = "in.tif: a single 2D image"
    else:
        path = tmp_path / "emptydir"
        path.mkdir()
        match = "emptydir: no .tif"
    out = tmp_path / "out"
    cfg = compose("prepare_data", ["source=tiff", f"source.path={path}", f"out={out}", "clip.frames=17",
                                   "clip.height=32", "clip.width=32", "source.rate_hz=10", "val_fraction=0",
                                   "source.calibration_frames=16", "clips_per_shard=1"])
    with pytest.raises(DataError, match=match):
        prepare_data(cfg)
    assert not list(out.rglob("*.tar")) and not (out / "index.json").exists()


def test_unknown_source_key_fails_at_compose():
    with pytest.raises(ConfigError, match="source.colour"):
        compose("prepare_data", ["source=sim", "+source.colour=3"])
