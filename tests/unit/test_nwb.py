"""NWB in and out: the source=nwb reader (axis order, rate, series choice, ROIs, remote URL) and the NWB files
written by write_nwb and jobs/sample.py out_format, each checked with pynwb's validator."""

from __future__ import annotations

import datetime
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pynwb
import pytest
import tifffile
from pynwb.ophys import ImageSegmentation, OnePhotonSeries, OpticalChannel, TwoPhotonSeries

from cadiff.config import compose
from cadiff.data.prepare import list_recordings, prepare_data
from cadiff.data.shards import iter_shard, read_index
from cadiff.data.simulate import simulate_movie
from cadiff.data.sources import open_movie
from cadiff.data.sources.nwb import NWBMovie, location_name, read_nwb, write_nwb
from cadiff.data.sources.tiff import write_tiff
from cadiff.errors import ConfigError, DataError
from cadiff.testing import run_job_in_process

# [T, H, W] with H != W, so a reader that forgets NWB's [t, x, y] order fails on shape and on values
MOVIE = (np.arange(9 * 12 * 10, dtype=np.uint32) * 37 % 4000).astype(np.uint16).reshape(9, 12, 10)


def _nwbfile(**series) -> pynwb.NWBFile:
    """An NWB file written the way NeuroConv does ([t, x, y]); ``series``: name -> (class, [T, H, W], rate|timestamps)."""
    nwbfile = pynwb.NWBFile(session_description="test", identifier="test",
                            session_start_time=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
    device = nwbfile.create_device(name="scope")
    channel = OpticalChannel(name="green", description="green", emission_lambda=520.0)
    plane = nwbfile.create_imaging_plane(name="plane", optical_channel=channel, device=device, description="p",
                                         excitation_lambda=920.0, indicator="GCaMP6f", location="V1", imaging_rate=10.0)
    for name, (cls, frames, timing) in series.items():
        timing = {"rate": timing} if np.isscalar(timing) else {"timestamps": timing}
        nwbfile.add_acquisition(cls(name=name, data=np.swapaxes(frames, 1, 2), imaging_plane=plane, unit="n.a.",
                                    **timing))
    return nwbfile


def _save(nwbfile: pynwb.NWBFile, path: Path) -> Path:
    with pynwb.NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def _valid(path: Path) -> None:
    errors = pynwb.validate(path=str(path))
    assert errors == [], errors


def test_reader_swaps_nwb_axes_reads_rate_timestamps_and_pixel_masks(tmp_path):
    times = np.arange(9) / 12.0 + 3.0
    nwbfile = _nwbfile(raw=(TwoPhotonSeries, MOVIE, 7.5), motion_corrected=(OnePhotonSeries, MOVIE[::-1], times))
    segmentation = ImageSegmentation(name="ImageSegmentation")
    nwbfile.create_processing_module(name="ophys", description="rois").add(segmentation)
    plane = segmentation.create_plane_segmentation(name="suite2p", description="d",
                                                   imaging_plane=nwbfile.imaging_planes["plane"],
                                                   reference_images=nwbfile.acquisition["motion_corrected"])
    plane.add_roi(pixel_mask=[(1, 2, 1.0), (9, 11, 0.5)])  # (x, y, weight): x is the column
    plane.add_roi(pixel_mask=[(0, 0, 1.0), (3, 4, 0.0)])  # a zero weight is outside the ROI
    path = _save(nwbfile, tmp_path / "rec.nwb")
    raw = read_nwb(path, series="raw")
    assert raw.shape == MOVIE.shape and raw.dtype == np.uint16 and raw.rate_hz == 7.5
    np.testing.assert_array_equal(raw.frames(0, 9), MOVIE)
    np.testing.assert_array_equal(raw.frames(2, 5), MOVIE[2:5])
    np.testing.assert_array_equal(raw.data[[4, 1, 1]], MOVIE[[4, 1, 1]])
    np.testing.assert_array_equal(raw.data[-1, 3:5], MOVIE[-1, 3:5])
    corrected = open_movie(path, key="motion_corrected")
    assert corrected.rate_hz == pytest.approx(12.0) and corrected.meta["timing"] == "timestamps"
    np.testing.assert_array_equal(corrected.frames(0, 9), MOVIE[::-1])
    assert corrected.rois.shape == (2, 12, 10) and corrected.rois.sum() == 3
    assert corrected.rois[0, 2, 1] and corrected.rois[0, 11, 9] and corrected.rois[1, 0, 0]
    assert corrected.meta["rois"] == {"plane_segmentation": "suite2p", "mask": "pixel_mask", "num_rois": 2, "ids": [0, 1]}


def _several(tmp_path: Path) -> Path:
    return _save(_nwbfile(raw=(TwoPhotonSeries, MOVIE, 10.0), mc=(TwoPhotonSeries, MOVIE, 10.0)), tmp_path / "two.nwb")


def _not_nwb(tmp_path: Path) -> Path:
    (tmp_path / "plain.nwb").write_bytes(b"not an HDF5 file" * 8)
    return tmp_path / "plain.nwb"


def _pixel_outside(tmp_path: Path) -> Path:
    nwbfile = _nwbfile(raw=(TwoPhotonSeries, MOVIE, 10.0))
    segmentation = ImageSegmentation(name="ImageSegmentation")
    nwbfile.create_processing_module(name="ophys", description="rois").add(segmentation)
    plane = segmentation.create_plane_segmentation(name="cells", description="d",
                                                   imaging_plane=nwbfile.imaging_planes["plane"])
    plane.add_roi(pixel_mask=[(10, 0, 1.0)])  # x = 10 in a 10-pixel-wide frame
    return _save(nwbfile, tmp_path / "px.nwb")


def _external(tmp_path: Path) -> Path:
    nwbfile = _nwbfile()
    nwbfile.add_acquisition(TwoPhotonSeries(name="raw", external_file=["movie.tif"], starting_frame=[0],
                                            format="external", imaging_plane=nwbfile.imaging_planes["plane"],
                                            rate=10.0, num_samples=9, unit="n.a."))
    return _save(nwbfile, tmp_path / "ext.nwb")


BACKWARDS = np.where(np.arange(9) == 5, 0.3, np.arange(9) / 10.0)  # frame 5 at 0.3 s, after frame 4 at 0.4 s
BAD_INPUTS = {  # name -> (writes the file, source.series, message regex)
    "missing": (lambda tmp: tmp / "missing.nwb", None, r"missing.nwb: no such NWB file"),
    "not_nwb": (_not_nwb, None, r"plain.nwb: not a readable NWB file"),
    "no_series": (lambda tmp: _save(_nwbfile(), tmp / "none.nwb"), None, r"none.nwb: no TwoPhotonSeries or OnePhotonSeries"),
    "several": (_several, None, r"two.nwb: 2 imaging series \['mc', 'raw'\]; set source.series"),
    "unknown": (_several, "dff", r"two.nwb: source.series='dff' is not in the file; expected one of \['mc', 'raw'\]"),
    "backwards_time": (lambda tmp: _save(_nwbfile(raw=(TwoPhotonSeries, MOVIE, BACKWARDS)), tmp / "t.nwb"), None,
                       r"t.nwb:raw: timestamps do not increase at frame 5"),
    "pixel_outside": (_pixel_outside, None, r"px.nwb:raw: PlaneSegmentation 'cells': pixel_mask has pixels outside "
                                            r"the 10x12 frame"),
    "external": (_external, None, r"ext.nwb:raw: frames are in external files \['movie.tif'\]; read those with source=tiff"),
    "volume": (lambda tmp: _save(_nwbfile(raw=(TwoPhotonSeries, np.zeros((4, 12, 10, 3), np.uint16), 10.0)),
                                 tmp / "vol.nwb"), None, r"vol.nwb:raw: data of shape \(4, 10, 12, 3\); expected a single-plane"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_nwb_inputs_name_the_file_and_what_was_expected(tmp_path, case):
    write, series, match = BAD_INPUTS[case]
    with pytest.raises(DataError, match=match):
        read_nwb(write(tmp_path), series=series)


def test_several_series_error_through_prepare_data_cli(tmp_path):
    path = _several(tmp_path)
    out = tmp_path / "out"
    result = run_job_in_process("prepare_data", ["source=nwb", f"source.path={path}", f"out={out}"])
    assert result.returncode == 2 and result.stdout.strip().splitlines() == [
        f"cadiff prepare_data: error: {path}: 2 imaging series ['mc', 'raw']; set source.series to one of them"]
    assert not out.exists()


def _movie_nwb(frames: np.ndarray, **extra) -> NWBMovie:
    return NWBMovie(frames=frames, rate_hz=10.0, description="test movie", origin="test", **extra)


def test_written_nwb_is_valid_and_reads_back_identical(tmp_path):
    rois = np.zeros((2, 12, 10), dtype=np.float32)
    rois[0, 2:4, 5:8], rois[1, 9, 0] = 0.5, 1.0
    traces = np.arange(18, dtype=np.float32).reshape(2, 9)
    path = write_nwb(tmp_path / "m.nwb", _movie_nwb(MOVIE, gain=500.0, offset=186.0, rois=rois,
                                                   traces={"CleanTraces": (traces, "n.a.", "clean")}), "session")
    _valid(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.nwb"]
    movie = read_nwb(path)
    np.testing.assert_array_equal(movie.frames(0, 9), MOVIE)
    np.testing.assert_array_equal(movie.rois, rois > 0)
    assert movie.gain == pytest.approx(500.0) and movie.offset == pytest.approx(186.0) and movie.rate_hz == 10.0
    with pynwb.NWBHDF5IO(str(path), "r") as io:
        nwbfile = io.read()
        series = nwbfile.acquisition["TwoPhotonSeries"]
        assert series.data.shape == (9, 10, 12) and list(series.dimension[:]) == [10, 12]  # NWB [t, x, y]
        np.testing.assert_array_equal(nwbfile.processing["ophys"]["Fluorescence"]["CleanTraces"].data[:], traces.T)


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pynwb.NWBHDF5IO, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_nwb(tmp_path / "m.nwb", _movie_nwb(MOVIE), "session")
    assert not any(tmp_path.iterdir())


def _shard_clips(root: Path) -> dict[str, np.ndarray]:
    index = read_index(root)
    return {key: clip for split in index["splits"].values() for shard in split["shards"]
            for key, clip, _ in iter_shard(root / shard["path"], "clips")}


def test_prepare_data_from_nwb_is_bit_identical_to_the_same_movie_as_tiff(tmp_path):
    movie, _ = simulate_movie(frames=40, height=24, width=16, seed=3)
    frames = np.asarray(movie.data)
    inputs = {"tiff": write_tiff(frames, tmp_path / "rec.tif", movie.rate_hz),
              "nwb": write_nwb(tmp_path / "rec.nwb", _movie_nwb(frames), "session")}
    common = ["clip.frames=9", "clip.height=8", "clip.width=8", "source.calibration_frames=16", "val_fraction=0.25"]
    prepared = {}
    for kind, path in inputs.items():
        out = tmp_path / f"out_{kind}"
        prepare_data(compose("prepare_data", [f"source={kind}", f"source.path={path}", f"out={out}", *common]))
        prepared[kind] = (read_index(out), _shard_clips(out))
    (index_tiff, clips_tiff), (index_nwb, clips_nwb) = prepared["tiff"], prepared["nwb"]
    assert sorted(clips_tiff) == sorted(clips_nwb) and len(clips_tiff) == 4 * 3 * 2
    for key, clip in clips_tiff.items():
        assert clip.dtype == clips_nwb[key].dtype and np.array_equal(clip, clips_nwb[key]), key
    assert index_tiff["normalization"] == index_nwb["normalization"]
    for field in ("gain", "offset", "read_noise", "rate_hz"):
        assert index_tiff["sources"]["rec"][field] == index_nwb["sources"]["rec"][field], field


class RangeFiles(http.server.SimpleHTTPRequestHandler):
    """Static files with closed ``Range: bytes=a-b`` requests (what remfile sends), like an object store."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        ranged = (self.headers.get("Range") or "").startswith("bytes=")
        if ranged:
            first, _, last = self.headers["Range"][6:].partition("-")
            start, end = int(first), min(int(last or end), end)
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        try:
            self.wfile.write(data[start: end + 1])
        except (BrokenPipeError, ConnectionResetError):
            pass  # remfile learns the size from a GET it closes after the headers


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            lambda *a, **k: RangeFiles(*a, directory=str(root), **k))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_nwb_url_streams_through_http_range_requests(server):
    root, url = server
    asset = root / "api" / "assets" / "abc-123" / "download"  # DANDI: .../assets/<asset id>/download/
    asset.parent.mkdir(parents=True)
    write_nwb(asset, _movie_nwb(MOVIE), "session")
    remote = f"{url}/api/assets/abc-123/download"
    assert location_name(f"{remote}/") == location_name(remote) == "abc-123"
    movie = read_nwb(remote)
    np.testing.assert_array_equal(movie.frames(3, 9), MOVIE[3:])
    (recording,) = list_recordings(compose("prepare_data", ["source=nwb", f"source.path={remote}"]).source)
    assert recording.rec_id == "abc-123" and recording.where == remote
    np.testing.assert_array_equal(recording.open().frames(0, 2), MOVIE[:2])
    with pytest.raises(DataError, match=r"127\.0\.0\.1.*/missing\.nwb: not a readable NWB file \(.*404"):
        read_nwb(f"{url}/missing.nwb")


def test_sample_out_format_is_validated():
    with pytest.raises(ConfigError, match=r"config key 'out_format' = 'hdf5': expected one of \['tiff', 'nwb', 'both'\]"):
        compose("sample", ["stage2=outputs/train_latent/x", "out_format=hdf5"])


def test_sample_out_format_both_writes_valid_nwb_with_provenance(stage1_run, sim_data_root, tmp_path):
    from cadiff.inference.sample import run_sample

    out = tmp_path / "recon"
    summary, _ = run_sample(compose("sample", ["mode=reconstruct", f"stage1={stage1_run}", f"data.root={sim_data_root}",
                                               f"out={out}", "num_samples=1", "decoder_steps=1", "seed=5",
                                               "out_format=both"]))
    record = json.loads((out / "samples.json").read_text())
    assert record["out_format"] == "both" and record["seed"] == 5
    _valid(out / "recon_000.nwb")
    movie = read_nwb(out / "recon_000.nwb")
    np.testing.assert_array_equal(movie.frames(0, movie.num_frames), tifffile.imread(out / "recon_000.tif"))
    assert movie.gain == pytest.approx(record["calibration"]["gain"])
    assert movie.rate_hz == pytest.approx(record["calibration"]["rate_hz"])
    with pynwb.NWBHDF5IO(str(out / "reference" / "clip_000.nwb"), "r") as io:
        description = io.read().acquisition["TwoPhotonSeries"].description
    head, _, provenance = description.partition("; provenance (JSON): ")
    provenance = json.loads(provenance)
    assert head == "reference clip 0 of the prepared data (data.root)"
    assert provenance["cadiff_version"] and provenance["stage1"] == record["stage1"] and provenance["seed"] == 5
    assert (provenance["decoder_sampler"], provenance["decoder_steps"]) == (record["decoder_sampler"], 1)


def test_sample_nwb_of_raw_unit_float_data_is_float32_in_the_source_units(stage1_run, tmp_path):
    from cadiff.inference.sample import run_sample
    from cadiff.testing.data import log_scaled_movie

    processed = log_scaled_movie(frames=63, size=40)  # a float movie without a photon signature
    tifffile.imwrite(tmp_path / "processed.tif", processed)
    root, out = tmp_path / "data", tmp_path / "recon"
    prepare_data(compose("prepare_data", ["source=tiff", f"source.path={tmp_path / 'processed.tif'}", "source.rate_hz=10",
                                          "source.calibration=none", "clip.frames=17", "clip.height=32", "clip.width=32",
                                          f"out={root}"]))
    run_sample(compose("sample", ["mode=reconstruct", f"stage1={stage1_run}", f"data.root={root}", f"out={out}",
                                  "num_samples=1", "decoder_steps=1", "out_format=both"]))
    record = json.loads((out / "samples.json").read_text())
    assert record["dtype"] == "float32" and record["calibration"]["calibration"] == "none"
    step = read_index(root)["sources"]["processed"]["raw"]["step"]
    for name in ("recon_000", "reference/clip_000"):
        _valid(out / f"{name}.nwb")
        movie = read_nwb(out / f"{name}.nwb")
        frames = movie.frames(0, movie.num_frames)
        assert frames.dtype == np.float32 and movie.gain is None and movie.offset is None  # unit n.a.: no photons
        np.testing.assert_array_equal(frames, tifffile.imread(out / f"{name}.tif"))
    # the reference clip is back in the movie's own units (log-scaled photons), not on the uint16 storage grid
    assert processed.min() - step <= frames.min() and frames.max() <= processed.max() + step
