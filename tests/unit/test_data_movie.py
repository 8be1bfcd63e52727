"""Movie container, lazy frames, frame reads and the normalize/denormalize round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cadiff.data.movie import LazyFrames, Movie, denormalize, normalize, read_frames, to_photons
from cadiff.errors import DataError

CALIB = {"gain": 2.5, "offset": 97.3, "read_noise": 4.0}


@pytest.mark.parametrize("kind", ["photon", "anscombe"])
def test_normalize_denormalize_round_trip_is_exact_on_uint16(kind):
    x = np.arange(90, 3000, dtype=np.uint16).reshape(1, -1)
    norm = {"kind": kind, "center": 12.0, "scale": 7.5}
    y = normalize(x, CALIB, norm)
    assert y.dtype == np.float32
    back = denormalize(y, CALIB, norm)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, x)


def test_normalize_accepts_torch_and_matches_numpy():
    x = np.random.default_rng(0).integers(100, 2000, size=(2, 5, 8, 8)).astype(np.int16)
    for kind in ("photon", "anscombe"):
        norm = {"kind": kind, "center": 3.0, "scale": 2.0}
        a = normalize(x, CALIB, norm)
        b = normalize(torch.from_numpy(x), CALIB, norm)
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float32
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(denormalize(b, CALIB, norm), x)


def test_photon_normalization_values_and_clipping():
    norm = {"kind": "photon", "center": 0.0, "scale": 1.0}
    np.testing.assert_allclose(normalize(np.array([97.3 + 25.0]), CALIB, norm), [10.0], rtol=1e-6)
    np.testing.assert_allclose(to_photons(np.array([102.3]), 2.5, 97.3), [2.0], rtol=1e-6)
    out = denormalize(np.array([-1e6, 1e9]), CALIB, norm)
    np.testing.assert_array_equal(out, [0, 65535])


def test_normalize_rejects_bad_calibration():
    with pytest.raises(DataError, match="gain"):
        normalize(np.zeros(3), {"gain": None, "offset": 0}, {"kind": "photon", "center": 0, "scale": 1})
    with pytest.raises(DataError, match="kind"):
        normalize(np.zeros(3), CALIB, {"kind": "log", "center": 0, "scale": 1})


def test_movie_rejects_2d_image_and_bad_rate():
    with pytest.raises(DataError, match="2D image"):
        Movie(data=np.zeros((8, 8), np.uint16), rate_hz=10, source="img.tif")
    with pytest.raises(DataError, match="frame rate"):
        Movie(data=np.zeros((2, 8, 8), np.uint16), rate_hz=0, source="m.tif")


def test_lazy_frames_slices_and_shape_errors():
    frames = [np.full((4, 5), i, np.uint16) for i in range(6)]
    lazy = LazyFrames(lambda i: frames[i], 6, (4, 5), np.uint16, "stack")
    assert lazy.shape == (6, 4, 5)
    np.testing.assert_array_equal(lazy[1:4][:, 0, 0], [1, 2, 3])
    np.testing.assert_array_equal(lazy[-1], frames[5])
    np.testing.assert_array_equal(lazy[::2, 1:3, 0], np.stack(frames)[::2, 1:3, 0])
    bad = LazyFrames(lambda i: np.zeros((3, 3)), 2, (4, 5), np.uint16, "bad stack")
    with pytest.raises(DataError, match="bad stack: frame 0"):
        bad[0]


def test_read_frames_from_big_endian_memmap(tmp_path):
    x = np.arange(6 * 4 * 5, dtype=">u2").reshape(6, 4, 5)
    path = tmp_path / "movie.raw"
    x.tofile(path)
    mm = np.memmap(path, dtype=">u2", mode="r", shape=(6, 4, 5))
    out = read_frames(mm, 2, 5)
    assert out.dtype == np.dtype("=u2")
    np.testing.assert_array_equal(out, x[2:5].astype("=u2"))
    np.testing.assert_array_equal(read_frames(mm, 4, 100), x[4:].astype("=u2"))
    movie = Movie(data=mm, rate_hz=30.0, source="raw")
    assert movie.dtype == np.dtype("=u2") and movie.shape == (6, 4, 5)


@settings(max_examples=60, deadline=None)
@given(gain=st.floats(0.05, 600.0), offset=st.floats(0.0, 500.0), read_noise=st.floats(0.0, 30.0),
       center=st.floats(-50.0, 50.0), scale=st.floats(0.1, 100.0), kind=st.sampled_from(["photon", "anscombe"]),
       values=st.lists(st.integers(0, 65535), min_size=1, max_size=50))
def test_round_trip_property(gain, offset, read_noise, center, scale, kind, values):
    calib = {"gain": gain, "offset": offset, "read_noise": read_noise}
    x = np.array([v for v in values if v >= offset] or [65535], dtype=np.uint16)  # Anscombe is invertible above offset
    np.testing.assert_array_equal(denormalize(normalize(x, calib, {"kind": kind, "center": center, "scale": scale}),
                                              calib, {"kind": kind, "center": center, "scale": scale}), x)
