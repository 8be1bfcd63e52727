"""prepare_data: counts, split by recording (or time), calibration, resume, CLI contract, bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

import cadiff.data.prepare as prepare_module
from cadiff.config import compose
from cadiff.data.movie import denormalize, normalize, to_source_units
from cadiff.data.prepare import STATE_NAME, prepare_data
from cadiff.data.shards import iter_shard, read_index
from cadiff.data.simulate import simulate_movie
from cadiff.errors import ConfigError, DataError, NoPhotonSignature
from cadiff.io import OUTPUT_MARKER
from cadiff.testing import torch_threads
from cadiff.testing.data import log_scaled_movie, prepare_sim
from cadiff.testing.faults import disk_full_after, fail_on_call

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


def _killed_build(root: Path) -> Path:
    """Turn a finished preparation into what a SIGKILLed one leaves: its tree in the build folder (no index),
    a lock of a dead process, no ``out``."""
    tree = root.parent / f".{root.name}.building" / root.name
    tree.parent.mkdir()
    root.rename(tree)
    (tree / "index.json").unlink()
    (tree / OUTPUT_MARKER).unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tree.parent / ".cadiff.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    return tree


def test_rerun_is_a_no_op_a_killed_build_resumes_and_other_settings_need_overwrite(tmp_path):
    root = tmp_path / "d"
    first = prepare_sim(root)
    shard = root / "train" / "clips-000000.tar"
    stamp = shard.stat().st_mtime_ns
    assert prepare_sim(root) == first
    assert shard.stat().st_mtime_ns == stamp
    _killed_build(root)
    assert prepare_sim(root)["num_train"] == first["num_train"]
    assert shard.stat().st_mtime_ns == stamp  # finished shards were kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and (root / OUTPUT_MARKER).is_file()
    with pytest.raises(ConfigError, match=rf"out '{root}' holds data prepared from other settings or inputs "
                                          r"\(clips_per_shard: 4 -> 8\); pass overwrite=true"):
        prepare_sim(root, "clips_per_shard=8")
    assert shard.stat().st_mtime_ns == stamp
    (root / OUTPUT_MARKER).unlink()  # prepared before output markers: still prepare_data's to replace
    changed = prepare_sim(root, "clips_per_shard=8", "overwrite=true")
    assert changed["num_train"] == first["num_train"]
    assert sorted(p.name for p in (root / "train").iterdir()) == ["clips-000000.tar", "clips-000001.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no build or old folder left beside it


def _as_prepared_before_the_calibration_option(root: Path, details: bool, poor_fit: str | None = None) -> None:
    """Rewrite a preparation's records as versions without source.calibration wrote them: the settings without the
    key and the fingerprint of those (``details``: the state record with settings and inputs, else the older
    ``{fingerprint, complete}``); ``poor_fit``: that recording's photon-transfer fit had R^2 0.3."""
    state = json.loads((root / STATE_NAME).read_text())
    del state["settings"]["source"]["calibration"]
    # the fingerprint those versions computed: sha256 of the settings and the input files (none for the simulator)
    text = json.dumps({"config": state["settings"], "files": []}, sort_keys=True)
    state["fingerprint"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    (root / STATE_NAME).write_text(json.dumps(state if details else {"fingerprint": state["fingerprint"], "complete": True}))
    index = json.loads((root / "index.json").read_text())
    index["fingerprint"] = state["fingerprint"]
    if poor_fit:
        index["sources"][poor_fit]["photon_transfer"]["r2"] = 0.3
    (root / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("details", [True, False], ids=["state_with_settings", "fingerprint_only_state"])
def test_data_prepared_before_source_calibration_existed_still_matches(tmp_path, details):
    root = tmp_path / "d"
    first = prepare_sim(root)
    _as_prepared_before_the_calibration_option(root, details)
    shard = root / "train" / "clips-000000.tar"
    stamp = shard.stat().st_mtime_ns
    # it was calibrated by photon transfer, as auto (the default) and photon_transfer still do: nothing to do
    assert prepare_sim(root) == first
    assert prepare_sim(root, "source.calibration=photon_transfer") == first
    changed = "source.calibration: 'photon_transfer' -> 'none'" if details else "its settings or input files differ"
    with pytest.raises(ConfigError, match=rf"out '{root}' holds data prepared from other settings or inputs "
                                          rf"\({changed}"):
        prepare_sim(root, "source.calibration=none")
    assert shard.stat().st_mtime_ns == stamp


def test_a_poor_fit_prepared_before_source_calibration_existed_is_not_what_auto_prepares(tmp_path):
    root = tmp_path / "d"
    first = prepare_sim(root)
    poor = sorted(first["sources"])[0]
    _as_prepared_before_the_calibration_option(root, True, poor_fit=poor)
    with pytest.raises(ConfigError, match=r"it was prepared before source.calibration existed, by photon transfer, "
                                          rf"and the fit is poor \(R\^2 < 0.5\) for {poor}, where source.calibration="
                                          r"auto now uses a dark offset or raw units; pass source.calibration="
                                          r"photon_transfer to keep that data\); pass overwrite=true"):
        prepare_sim(root)
    assert prepare_sim(root, "source.calibration=photon_transfer") == first


def _tiff_args(path: Path, out: Path, *extra: str) -> list[str]:
    return ["source=tiff", f"source.path={path}", f"out={out}", "clip.frames=17", "clip.height=32", "clip.width=32",
            "source.rate_hz=10", "val_fraction=0", "source.calibration_frames=16", "clips_per_shard=1", *extra]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_changed_input_is_refused_and_a_failed_overwrite_keeps_the_old_data(tmp_path):
    path, out = tmp_path / "rec.tif", tmp_path / "out"
    movie = simulate_movie(frames=60, height=32, width=32, seed=0)[0].data.astype(np.float32)
    tifffile.imwrite(path, movie)
    prepare_data(compose("prepare_data", _tiff_args(path, out)))
    before = _files(out)
    movie[30, 3, 3] = np.nan  # the new recording fails late, while tiling, after shards were written
    tifffile.imwrite(path, movie)
    with pytest.raises(ConfigError, match=rf"out '{out}' .*\(changed input files: {path}\); pass overwrite=true"):
        prepare_data(compose("prepare_data", _tiff_args(path, out)))
    with pytest.raises(DataError, match=r"rec.tif: frame 30 contains NaN"):
        prepare_data(compose("prepare_data", _tiff_args(path, out, "overwrite=true")))
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rec.tif"]


def test_a_folder_prepare_data_did_not_write_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(ConfigError, match=rf"out '{out}' is a non-empty folder that no cadiff prepare_data run wrote"):
        prepare_sim(out, "overwrite=true")
    assert _files(out) == {"notes.txt": b"keep me\n"}


def _fail_on_call(monkeypatch, name: str, call: int, exc: BaseException) -> None:
    """Make ``cadiff.data.prepare.<name>`` raise ``exc`` on its ``call``-th use (earlier ones work)."""
    monkeypatch.setattr(prepare_module, name, fail_on_call(getattr(prepare_module, name), call, exc))


def _enospc_mid_split(monkeypatch, out: Path) -> None:
    """The shard writer gets ENOSPC after its first shard is on disk."""
    monkeypatch.setattr(prepare_module, "write_shards", disk_full_after(prepare_module.write_shards, 5))


FAULTS = {
    "enospc": (_enospc_mid_split, DataError, r"{out}: No space left on device \(.*\.building/.*clips-000005\.tar\) while "
               r"tiling .*; free disk space or choose another out \(the unfinished build was removed, {kept}\)"),
    "memory": (lambda mp, out: _fail_on_call(mp, "read_frames", 3, MemoryError()), DataError,
               r"{out}: out of memory while tiling simulator preset=default seed=\d; crop or bin the movie.*{kept}"),
    "interrupt": (lambda mp, out: _fail_on_call(mp, "read_frames", 3, KeyboardInterrupt()), KeyboardInterrupt, None),
}


@pytest.mark.parametrize("earlier", [False, True], ids=["new_out", "over_earlier_data"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_mid_way_leaves_no_partial_output(tmp_path, monkeypatch, sim_data_root, fault, earlier):
    out = tmp_path / "data"
    if earlier:
        shutil.copytree(sim_data_root, out)
    before = _files(out) if earlier else None
    inject, error, match = FAULTS[fault]
    inject(monkeypatch, out)
    kept = "the earlier data there is untouched" if earlier else "nothing was kept"
    with pytest.raises(error, match=match and match.format(out=re.escape(str(out)), kept=kept)):
        prepare_sim(out, "clips_per_shard=1", "overwrite=true")
    assert (_files(out) if earlier else out.exists()) == (before if earlier else False)
    assert [p.name for p in tmp_path.iterdir()] == (["data"] if earlier else [])


@pytest.mark.parametrize("calibration", ["photon_transfer", "none", "auto"])
def test_estimate_is_close_to_what_is_written_and_allocated(tmp_path, calibration):
    # photon transfer on a raw movie; raw units (none, and auto falling back to them) on a processed float movie
    path, out = tmp_path / "rec.tif", tmp_path / "out"
    movie = (simulate_movie(frames=68, height=96, width=96, seed=0)[0].data if calibration == "photon_transfer"
             else log_scaled_movie(frames=68, size=96))
    tifffile.imwrite(path, movie)
    cfg = compose("prepare_data", [*_tiff_args(path, out, "clips_per_shard=8"), "source.calibration_frames=1024",
                                   f"source.calibration={calibration}"])
    tracemalloc.start()
    try:
        prepare_data(cfg)
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = read_index(out)["estimate"]
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert estimate["clips"] == 4 * 3 * 3 and written <= estimate["disk_bytes"] <= written + 32 * 1024
    assert allocated <= estimate["peak_memory_bytes"] <= 3 * allocated


@pytest.mark.parametrize("case", ["disk", "memory"])
def test_preflight_refuses_a_huge_hdf5_before_reading_pixels(tmp_path, case):
    shape = (10_000_000, 4096, 4096) if case == "disk" else (20, 100_000, 100_000)
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:  # declared, never written: a few KB on disk
        f.create_dataset("data", shape=shape, dtype="uint16", chunks=(1, 256, 256))
    out = tmp_path / "out"
    cfg = compose("prepare_data", ["source=hdf5", f"source.path={path}", "source.rate_hz=10", f"out={out}",
                                   "clip.frames=17", "clip.height=64", "clip.width=64"])
    match = (rf"{out}: the prepared data needs about [\d.]+ TiB on disk \(2,4\d\d,\d{{3}},\d{{3}} clips of 17x64x64 uint16, .* "
             rf"from {path}:data\), but only .* are free there" if case == "disk" else
             rf"{path}:data: a 20x100000x100000 uint16 movie needs about [\d.]+ TiB of memory to read \(17 frames of "
             r"100000x100000 at a time\), but only .* are available")
    start = time.perf_counter()
    with pytest.raises(DataError, match=match):
        prepare_data(cfg)
    assert time.perf_counter() - start < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5"]


def _float_tiff(tmp_path: Path, negative_values: int, shift: float = 0.0) -> Path:
    movie = simulate_movie(frames=60, height=32, width=32, seed=0)[0].data.astype(np.float32) + shift
    movie[20].flat[:negative_values] = -50.0  # frame 20: outside the calibration windows (frames 0-7, 48-55)
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, movie)
    return path


def test_clipping_more_than_a_tenth_of_a_percent_is_refused(tmp_path, caplog):
    # 3 chunks of 17 frames x 32 x 32 are converted: 52224 values, 0.1% of them is 52.2
    ok = prepare_data(compose("prepare_data", _tiff_args(_float_tiff(tmp_path, 52), tmp_path / "ok")))
    assert ok["num_train"] == 3 and "52 values (0.100%) outside the uint16 range were clipped" in caplog.text
    with pytest.raises(DataError, match=r"float.tif: 0.15% of the values read so far \(53 of 34816\) lie outside the "
                                        r"uint16 range 0..65535 and would be clipped \(at most 0.1% of a recording"):
        prepare_data(compose("prepare_data", _tiff_args(_float_tiff(tmp_path, 53), tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_all_negative_or_constant_movies_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"float.tif: 100.00% of the values read so far .* would be clipped.*"
                                        r"expected raw detector ADU"):
        prepare_data(compose("prepare_data", _tiff_args(_float_tiff(tmp_path, 0, shift=-70000.0), tmp_path / "neg",
                                                        "source.gain=2", "source.offset=100")))
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.full((60, 32, 32), 100, dtype=np.uint16))
    with pytest.raises(DataError, match=r"flat.tif: every value is 100 \(zero variance\); expected a movie with signal"):
        prepare_data(compose("prepare_data", _tiff_args(path, tmp_path / "flat", "source.gain=2", "source.offset=100")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.tif", "float.tif"]


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


# ---------------------------------------------------------------------------------------------------------
# data without a photon signature: source.calibration=auto | photon_transfer | dark | none

RAW_CLIPS = ["clip.height=32", "clip.width=32", "clip.stride_px=8", "source.rate_hz=10"]


def _no_signature_movie(folder: Path, kind: str) -> tuple[list[str], np.ndarray]:
    """``processed``: a float32 TIFF (63x40x40) with a negative photon-transfer slope; ``short``: a 5-frame
    big-endian uint16 HDF5 movie. Returns the source overrides (clips of 17 or 5 frames) and the movie."""
    if kind == "processed":
        data = log_scaled_movie(frames=63, size=40)
        tifffile.imwrite(folder / "processed.tif", data)
        return ["source=tiff", f"source.path={folder / 'processed.tif'}", "clip.frames=17"], data
    data = simulate_movie(frames=5, height=40, width=40, seed=3)[0].data
    with h5py.File(folder / "short.h5", "w") as f:
        f["data"] = data.astype(">u2")
    return ["source=hdf5", f"source.path={folder / 'short.h5'}", "clip.frames=5"], data


@pytest.mark.parametrize("kind", ["processed", "short"])
@pytest.mark.parametrize("calibration", ["none", "auto"])
def test_movie_without_photon_signature_prepares_in_raw_units(tmp_path, caplog, kind, calibration):
    source, data = _no_signature_movie(tmp_path, kind)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cadiff.data.prepare"):
        summary = prepare_data(compose("prepare_data", [*source, *RAW_CLIPS, f"source.calibration={calibration}",
                                                        "val_fraction=0", f"out={out}"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if calibration == "auto":  # one line: which method, why, and the override for raw detector data
        reason = "slope .* is not positive" if kind == "processed" else "needs >= 8 frames"
        assert len(warnings) == 1 and re.search(f"{kind}.*calibration=auto found no photon signature.*{reason}.*"
                                                "normalized in raw units.*pass source.gain and source.offset", warnings[0])
    else:
        assert warnings == []
    index = read_index(out)
    norm, (calib,) = index["normalization"], index["sources"].values()
    assert norm["kind"] == "raw" and calib["calibration"] == "none" and calib["gain"] is None
    assert summary["sources"][kind]["calibration"] == "none" and summary["num_train"] == (12 if kind == "processed" else 4)
    raw = calib["raw"]
    assert (raw["zero"], raw["step"]) == ((0.0, 1.0) if kind == "short" else (raw["zero"], raw["step"]))
    for _, tile, meta in _clips(out, "train"):
        t, y, x = meta["t0"], meta["y0"], meta["x0"]
        source_values = data[t: t + tile.shape[0], y: y + 32, x: x + 32]
        back = to_source_units(denormalize(normalize(tile, calib, norm), calib, norm), calib)
        np.testing.assert_array_equal(back, to_source_units(tile, calib))  # the normalization inverts exactly
        # back in the movie's own units: exact for integers, within half a storage step for floats
        np.testing.assert_allclose(back, source_values, rtol=0, atol=raw["step"] / 2 * 1.001)
    z = np.concatenate([normalize(a, calib, norm).ravel() for _, a, _ in _clips(out, "train")])
    assert abs(z.mean()) < 1e-3 and z.std() == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("calibration", ["photon_transfer", "dark"])
def test_explicit_photon_methods_fail_naming_the_overrides(tmp_path, calibration):
    source, _ = _no_signature_movie(tmp_path, "processed")
    cfg = compose("prepare_data", [*source, *RAW_CLIPS, f"source.calibration={calibration}", f"out={tmp_path / 'out'}"])
    with pytest.raises(NoPhotonSignature, match=r"processed.tif: (noise|dark-offset) calibration failed: .*; pass "
                                                r"source.gain and source.offset .*, or source.calibration=none"):
        prepare_data(cfg)
    assert not (tmp_path / "out").exists()


def test_short_movie_with_given_gain_and_offset_keeps_photon_units(tmp_path):
    source, _ = _no_signature_movie(tmp_path, "short")
    prepare_data(compose("prepare_data", [*source, *RAW_CLIPS, "source.gain=2", "source.offset=100", "val_fraction=0",
                                          f"out={tmp_path / 'out'}"]))
    index = read_index(tmp_path / "out")
    assert index["sources"]["short"]["calibration"] == "given" and index["normalization"]["kind"] == "anscombe"


def test_auto_uses_the_dark_offset_when_photon_transfer_fails(tmp_path, caplog, monkeypatch):
    def no_line(*args, **kwargs):
        raise NoPhotonSignature("movie (48, 40, 40): photon-transfer slope -1 is not positive")

    monkeypatch.setattr(prepare_module, "estimate_photon_transfer", no_line)
    movie, truth = simulate_movie(preset="two_photon", frames=48, height=40, width=40, seed=0)
    tifffile.imwrite(tmp_path / "twop.tif", movie.data)
    with caplog.at_level(logging.WARNING, logger="cadiff.data.prepare"):
        prepare_data(compose("prepare_data", ["source=tiff", f"source.path={tmp_path / 'twop.tif'}", "clip.frames=17",
                                              *RAW_CLIPS, f"out={tmp_path / 'out'}"]))
    calib = read_index(tmp_path / "out")["sources"]["twop"]
    assert calib["calibration"] == "dark" and calib["photon_transfer"]["method"] == "dark_pixels"
    # the darkest pixels still see a little light: the offset is an upper bound, here within 0.02 photons
    assert calib["offset"] == pytest.approx(truth.offset, abs=10.0) and calib["gain"] == pytest.approx(truth.gain, rel=0.2)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"{tmp_path / 'twop.tif'}: source.calibration=auto used dark (photon_transfer: movie (48, 40, 40): "
        "photon-transfer slope -1 is not positive)"]


def test_auto_normalizes_every_recording_in_raw_units_when_one_lacks_a_photon_signature(tmp_path, caplog):
    folder = tmp_path / "movies"
    folder.mkdir()
    _no_signature_movie(folder, "processed")
    tifffile.imwrite(folder / "raw.tif", simulate_movie(frames=63, height=40, width=40, seed=4)[0].data)
    with caplog.at_level(logging.WARNING, logger="cadiff.data.prepare"):
        prepare_data(compose("prepare_data", ["source=tiff", f"source.path={folder}/*.tif", "clip.frames=17", *RAW_CLIPS,
                                              f"out={tmp_path / 'out'}"]))
    index = read_index(tmp_path / "out")
    assert index["normalization"]["kind"] == "raw"
    assert {k: v["calibration"] for k, v in index["sources"].items()} == {"processed": "none", "raw": "none"}
    assert any("['processed'] have no photon signature, so every recording is normalized in raw units" in r.getMessage()
               for r in caplog.records)


def test_calibration_option_is_checked_at_compose():
    with pytest.raises(ConfigError, match=r"source.calibration' = 'photons'.*\['auto', 'photon_transfer', 'dark', 'none'\]"):
        compose("prepare_data", ["source=sim", "source.calibration=photons"])
    with pytest.raises(ConfigError, match=r"source.calibration' = 'none'.*given \{'gain': 2.0\}"):
        compose("prepare_data", ["source=sim", "source.calibration=none", "source.gain=2"])


@pytest.fixture(scope="module")
def raw_data_root(tmp_path_factory) -> Path:
    """The processed movie prepared with source.calibration=none: 8 train + 4 val clips of 17x32x32 (time split)."""
    folder = tmp_path_factory.mktemp("raw_units")
    source, _ = _no_signature_movie(folder, "processed")
    prepare_data(compose("prepare_data", [*source, *RAW_CLIPS, "source.calibration=none", f"out={folder / 'data'}"]))
    return folder / "data"


def test_raw_unit_data_trains_with_a_homoscedastic_noise_model(raw_data_root, caplog):
    import torch

    from cadiff.data import pipeline
    from cadiff.models.registry import build_model
    from cadiff.train.loop import TrainingModule
    from cadiff.train.media import to_preview_units
    from cadiff.train.stage import ClipStage
    from cadiff.train.step import train_step
    from cadiff.train.strategies import build_strategy

    cfg = compose("train_ae", ["experiment=ae_tiny", "strategy=single", "trainer.num_workers=1", "trainer.warmup_steps=0",
                               "model.recompute_elementwise=false", f"data.root={raw_data_root}", "data.crop_frames=9",
                               "data.crop_height=16", "data.crop_width=16"])
    with caplog.at_level(logging.INFO, logger="cadiff.train.stage"):
        info, model_cfg = ClipStage().resolve(cfg)
    index = read_index(raw_data_root)
    raw = index["sources"]["processed"]["raw"]
    # no gain, so no photon noise model: Gaussian noise of the std measured from frame differences at prepare time
    assert model_cfg["noise_model"]["kind"] == "none"
    assert model_cfg["noise_std"] == pytest.approx(raw["noise_std"] / raw["scale"] / index["normalization"]["scale"])
    assert any("photon noise model is not applicable" in m for m in caplog.messages)
    # the photon split needs photon counts: refused on the driver, before any worker, naming the index
    split = compose("train_ae", ["experiment=ae_tiny", f"data.root={raw_data_root}", "model.mean_target=photon_split"])
    with pytest.raises(ConfigError, match=r"photon_split' thins photon counts, but .*index.json is in raw units"):
        ClipStage().resolve(split)
    torch.manual_seed(0)
    strategy = build_strategy(cfg.strategy, cfg.trainer)
    strategy.setup(TrainingModule(build_model(model_cfg)), torch.device("cpu"))
    batches = pipeline.deterministic_batches(raw_data_root, "train", cfg.data, rank=0, world_size=1, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch_threads(1):  # two tiny steps: threads only add overhead on a shared machine
        losses = [float(train_step(strategy, batches, step, generator=generator).loss) for step in range(2)]
    assert all(np.isfinite(losses)), losses
    # previews show the movie's own units: the first val clip, centre-cropped, exactly as stored
    preview = to_preview_units(pipeline.val_batch(raw_data_root, 1, cfg.data), info.normalization,
                               info.preview_calibration())
    (_, tile, _), *_ = _clips(raw_data_root, "val")
    expected = to_source_units(tile[4:13, 8:24, 8:24], index["sources"]["processed"])
    np.testing.assert_allclose(preview[0], expected, rtol=1e-6)


@pytest.mark.slow  # ~6 s of CPU, most of it matplotlib drawing the report's figures
def test_evaluate_reports_gain_metrics_as_not_applicable_in_raw_units(raw_data_root, tmp_path):
    from cadiff.testing import run_job_in_process

    gen, out = tmp_path / "gen", tmp_path / "eval"
    gen.mkdir()
    for i in range(2):  # "generated" movies in the source's own units, as jobs/sample.py writes them
        tifffile.imwrite(gen / f"sample_{i:03d}.tif", log_scaled_movie(frames=17, size=32, seed=10 + i))
    (gen / "samples.json").write_text('{"calibration": {"source": "processed", "calibration": "none", "rate_hz": 10}}')
    proc = run_job_in_process("evaluate", [f"gen={gen}", f"ref={raw_data_root}", f"out={out}", "acf_lags=4"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.match(r"cadiff evaluate: ok gain_ratio=n/a units=raw mmd=", proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["units"] == "raw" and set(metrics["noise"]) > {"gain_ratio", "not_applicable"}
    assert all(v is None for k, v in metrics["noise"].items() if k != "not_applicable")
    assert "source.calibration=none" in metrics["noise"]["not_applicable"]
    assert not {"log_gain", "offset"} & set(metrics["mmd"]["feature_names"])
    assert metrics["ref"]["calibrations"][0]["units"] == "raw" and "gain_fit" not in metrics["figures"]
    report = (out / "report.md").read_text()
    assert "not applicable: the data has no photon calibration" in report and "## Metrics (raw units" in report
    assert not (out / "gain_fit.png").exists()
    # a generated set in photon units cannot be compared with raw-unit data
    (gen / "samples.json").write_text('{"gain": 2.0, "offset": 100.0, "rate_hz": 10}')
    mixed = run_job_in_process("evaluate", [f"gen={gen}", f"ref={raw_data_root}", f"out={tmp_path / 'mixed'}"])
    assert mixed.returncode == 2 and re.search(r"error: .*gen is in photons units but .* in raw units",
                                               mixed.stdout.strip().splitlines()[-1])
