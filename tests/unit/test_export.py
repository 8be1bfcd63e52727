"""jobs/export.py: simulated movies with their ground truth as TIFF + NPZ, valid NWB and suite2p folders."""

from __future__ import annotations

import json

import numpy as np
import pynwb
import pytest
import tifffile

from cadiff.config import compose
from cadiff.data.simulate import simulate_movie
from cadiff.data.sources.nwb import read_nwb
from cadiff.errors import ConfigError
from cadiff.testing import run_job_in_process

TINY = ["source.frames=20", "source.height=16", "source.width=12", "source.num_neurons=3"]


def test_export_job_layout_ground_truth_and_valid_nwb(tmp_path):
    out = tmp_path / "export"
    result = run_job_in_process("export", ["source.num_movies=2", *TINY, f"out={out}"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == \
        f"cadiff export: ok 2 movies 20x16x12 with ground truth (tiff, nwb, suite2p) -> {out}"
    manifest = json.loads((out / "export.json").read_text())
    assert [m["id"] for m in manifest["movies"]] == ["sim-000", "sim-001"]
    for i, entry in enumerate(manifest["movies"]):
        name = entry["id"]
        movie, truth = simulate_movie(frames=20, height=16, width=12, num_neurons=3, seed=i, return_clean=False)
        np.testing.assert_array_equal(tifffile.imread(out / "tiff" / f"{name}.tif"), movie.data)
        saved = np.load(out / "tiff" / f"{name}.npz")
        for key in ("footprints", "rois", "spikes", "traces", "background", "shifts"):
            np.testing.assert_array_equal(saved[key], getattr(truth, key), err_msg=key)
        assert saved["spike_time_s"].size == truth.spikes.sum() and float(saved["gain"]) == truth.gain
        np.testing.assert_array_equal(np.bincount(saved["spike_neuron"], minlength=3), truth.spikes.sum(axis=1))
        assert pynwb.validate(path=str(out / "nwb" / f"{name}.nwb")) == []
        from_nwb = read_nwb(out / "nwb" / f"{name}.nwb")
        np.testing.assert_array_equal(from_nwb.frames(0, 20), movie.data)
        np.testing.assert_array_equal(from_nwb.rois, truth.rois)
        with pynwb.NWBHDF5IO(str(out / "nwb" / f"{name}.nwb"), "r") as io:
            fluorescence = io.read().processing["ophys"]["Fluorescence"]
            np.testing.assert_array_equal(fluorescence["CleanTraces"].data[:].T, truth.traces)
            np.testing.assert_array_equal(fluorescence["SpikeCounts"].data[:].T, truth.spikes)
        folder = out / "suite2p" / name
        assert sorted(p.name for p in folder.iterdir()) == ["db.json", f"{name}.tif"]  # one TIFF: one recording
        db = json.loads((folder / "db.json").read_text())
        assert db["data_path"] == [str(folder.resolve())] and db["fs"] == movie.rate_hz
        np.testing.assert_array_equal(tifffile.imread(folder / f"{name}.tif"), movie.data)


@pytest.mark.parametrize("args, match", [
    (["source=tiff", "source.path=x.tif"], r"config key 'source.name' = 'tiff': expected sim: export writes simulated"),
    (["formats=[tiff,hdf5]"], r"config key 'formats' = \['tiff', 'hdf5'\]: expected a non-empty list of distinct"),
])
def test_export_bad_config_is_one_line_and_writes_nothing(tmp_path, args, match):
    out = tmp_path / "export"
    result = run_job_in_process("export", [*args, f"out={out}"])
    assert result.returncode == 2 and len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert result.stdout.startswith("cadiff export: error: ") and not out.exists()
    with pytest.raises(ConfigError, match=match):
        compose("export", [*args, f"out={out}"])


def test_suite2p_alone_writes_its_own_tiff(tmp_path):
    out = tmp_path / "export"
    result = run_job_in_process("export", ["source.num_movies=1", *TINY, "formats=[suite2p]", f"out={out}"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["config.yaml", "export.json", "run.json", "suite2p"]
    movie, _ = simulate_movie(frames=20, height=16, width=12, num_neurons=3, seed=0, return_clean=False)
    np.testing.assert_array_equal(tifffile.imread(out / "suite2p" / "sim-000" / "sim-000.tif"), movie.data)
    assert json.loads((out / "export.json").read_text())["movies"][0]["files"] == {"suite2p": "suite2p/sim-000"}


def test_export_failing_midway_leaves_no_output(tmp_path, monkeypatch):
    from cadiff.data import export

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(export, "write_nwb", out_of_memory)
    with pytest.raises(MemoryError):
        export.export_simulated(compose("export", ["source.num_movies=1", *TINY, f"out={tmp_path / 'export'}"]))
    assert not any(tmp_path.iterdir())  # neither the output nor the temp folder it was built in
