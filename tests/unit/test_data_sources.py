"""Readers: TIFF (file/folder, byte order, compression), HDF5, Thunder .bin, Neurofinder folders, real samples."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile

from cadiff.data.movie import Movie
from cadiff.data.sources import open_movie
from cadiff.data.sources.allen import read_allen
from cadiff.data.sources.hdf5 import read_hdf5
from cadiff.data.sources.neurofinder import read_neurofinder
from cadiff.data.sources.thunder import read_thunder
from cadiff.data.sources.tiff import read_tiff
from cadiff.errors import DataError
from cadiff.inference.sample import write_movie

MOVIE = (np.arange(7 * 12 * 10, dtype=np.uint32) * 37 % 4000).astype(np.uint16).reshape(7, 12, 10)


@pytest.mark.parametrize("byteorder,compression", [("<", None), (">", None), ("<", "zlib")])
def test_tiff_file_any_byte_order(tmp_path, byteorder, compression):
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, MOVIE, byteorder=byteorder, compression=compression)
    movie = read_tiff(path, rate_hz=7.5)
    assert movie.shape == MOVIE.shape and movie.dtype == np.uint16 and movie.rate_hz == 7.5
    np.testing.assert_array_equal(movie.frames(0, 7), MOVIE)
    np.testing.assert_array_equal(movie.frames(3, 5), MOVIE[3:5])


def test_tiff_imagej_frame_rate(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, MOVIE, imagej=True, metadata={"axes": "TYX", "finterval": 0.25})
    assert read_tiff(path).rate_hz == pytest.approx(4.0)


@pytest.mark.parametrize("writer,expected_um", [
    (dict(imagej=True, resolution=(1 / 0.8, 1 / 0.8), metadata={"axes": "TYX", "unit": "um"}), 0.8),
    (dict(imagej=True, resolution=(2.0, 2.0), metadata={"axes": "TYX", "unit": "micron"}), 0.5),
    (dict(imagej=True, resolution=(1 / 1.5, 1 / 1.5), metadata={"axes": "TYX", "unit": "mm"}), 1500.0),
    (dict(ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 0.6, "PhysicalSizeXUnit": "µm"}), 0.6),
    (dict(resolution=(12500.0, 12500.0), resolutionunit="CENTIMETER"), 0.8),
    (dict(resolution=(72.0, 72.0), resolutionunit="INCH"), None),  # many writers' default, not a measurement
    (dict(imagej=True, resolution=(1.0, 1.0), metadata={"axes": "TYX", "unit": "pixel"}), None),
    (dict(), None),
])
def test_tiff_pixel_size(tmp_path, writer, expected_um):
    path = tmp_path / "px.tif"
    tifffile.imwrite(path, MOVIE, **writer)
    pixel_um = read_tiff(path, rate_hz=5).pixel_size_um
    assert pixel_um == (None if expected_um is None else pytest.approx(expected_um))


def test_movie_rejects_a_bad_pixel_size():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DataError, match=r"rec: pixel size .* expected a positive number"):
            Movie(data=MOVIE, rate_hz=5.0, source="rec", pixel_size_um=bad)


def test_sample_tiffs_play_at_the_source_rate_with_its_pixel_size(tmp_path):
    """What sample.py writes: Fiji animates at ImageJ's ``fps`` (``finterval`` is the time calibration) and
    reads the pixel size from the resolution tags + ``unit``; cadiff's own reader gets both back."""
    tif, _, _ = write_movie(MOVIE, tmp_path / "s", {"rate_hz": 30.0, "pixel_size_um": 0.78}, fps=10)
    with tifffile.TiffFile(tif) as tf:
        ij = tf.imagej_metadata
        assert ij["fps"] == 30.0 and ij["finterval"] == pytest.approx(1 / 30) and ij["unit"] == "um"
        assert ij["frames"] == MOVIE.shape[0]
    back = read_tiff(tif)
    assert back.rate_hz == pytest.approx(30.0) and back.pixel_size_um == pytest.approx(0.78)
    np.testing.assert_array_equal(back.frames(0, 7), MOVIE)
    plain, _, _ = write_movie(MOVIE, tmp_path / "p", {"rate_hz": 7.0}, fps=10)  # the source had no pixel size
    with tifffile.TiffFile(plain) as tf:
        assert "unit" not in tf.imagej_metadata and tf.imagej_metadata["fps"] == 7.0
    assert read_tiff(plain).pixel_size_um is None


def test_tiff_folder_of_pages_and_chunks(tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    for i, frame in enumerate(MOVIE):
        tifffile.imwrite(pages / f"image{i}.tiff", frame)  # natural order: image2 before image10
    np.testing.assert_array_equal(read_tiff(pages, rate_hz=5).frames(0, 7), MOVIE)
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    tifffile.imwrite(chunks / "a_00001.tif", MOVIE[:4])
    tifffile.imwrite(chunks / "a_00002.tif", MOVIE[4:])
    np.testing.assert_array_equal(read_tiff(chunks, rate_hz=5).frames(2, 7), MOVIE[2:])


def test_tiff_bad_inputs_name_the_file(tmp_path):
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, MOVIE[0])
    with pytest.raises(DataError, match=r"image\.tif.*2D image"):
        read_tiff(image)
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, MOVIE)
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.tif"):
        read_tiff(truncated, rate_hz=5)
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(DataError, match="garbage.tif"):
        read_tiff(garbage)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .tif"):
        read_tiff(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    tifffile.imwrite(mixed / "f0.tif", MOVIE[0])
    tifffile.imwrite(mixed / "f1.tif", MOVIE[0, :6])
    with pytest.raises(DataError, match="f1.tif"):
        read_tiff(mixed)


def test_hdf5_key_byte_order_rate_and_errors(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("mov", data=MOVIE.astype(">u2"), chunks=(2, 12, 10))
        f["mov"].attrs["frame_rate"] = 12.5
        f["image"] = MOVIE[0]
    movie = read_hdf5(path, "mov")
    assert movie.rate_hz == 12.5 and movie.dtype == np.uint16 and isinstance(movie.data, h5py.Dataset)
    assert movie.pixel_size_um is None
    with h5py.File(tmp_path / "px.h5", "w") as f:
        f["mov"] = MOVIE
        f["mov"].attrs["element_size_um"] = [1.0, 0.9, 0.7]  # [t or z, y, x] (Fiji / ilastik); x is kept
        f["mov"].attrs["pixel_size_um"] = "n/a"  # not a number: ignored
    assert read_hdf5(tmp_path / "px.h5", "mov", rate_hz=5).pixel_size_um == pytest.approx(0.7)
    np.testing.assert_array_equal(movie.frames(1, 6), MOVIE[1:6])
    with pytest.raises(DataError, match=r"no dataset 'data'.*'image', 'mov'"):
        read_hdf5(path, "data")
    with pytest.raises(DataError, match="2D image"):
        read_hdf5(path, "image")
    not_h5 = tmp_path / "x.h5"
    not_h5.write_bytes(b"nope")
    with pytest.raises(DataError, match="x.h5"):
        read_hdf5(not_h5, "data")


def test_float_tiff_movie_reads(tmp_path):
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, MOVIE.astype(np.float32) / 3)
    movie = open_movie(path, rate_hz=3)
    assert movie.dtype == np.float32
    np.testing.assert_allclose(movie.frames(0, 2), MOVIE[:2] / 3, rtol=1e-6)


def _neurofinder_folder(root, with_info=True, with_regions=True):
    folder = root / "neurofinder.99.00"
    (folder / "images").mkdir(parents=True)
    for i, frame in enumerate(MOVIE):
        tifffile.imwrite(folder / "images" / f"image{i:05d}.tiff", frame)
    if with_info:
        (folder / "info.json").write_text(json.dumps({"rate-hz": 7.0, "indicator": "GCaMP6s"}))
    if with_regions:
        (folder / "regions").mkdir()
        regions = [{"coordinates": [[1, 2], [1, 3], [2, 2]]}, {"coordinates": [[10, 9], [11, 9]]}]
        (folder / "regions" / "regions.json").write_text(json.dumps(regions))
    return folder


def test_neurofinder_folder_with_and_without_regions(tmp_path):
    folder = _neurofinder_folder(tmp_path / "a")
    movie = read_neurofinder(tmp_path / "a")  # the parent of the data folder works too
    assert movie.rate_hz == 7.0 and movie.shape == MOVIE.shape
    np.testing.assert_array_equal(movie.frames(0, 7), MOVIE)
    assert movie.rois.shape == (2, 12, 10) and movie.rois[0, 1, 3] and movie.rois[1, 11, 9] and movie.rois.sum() == 5
    assert open_movie(folder).rate_hz == 7.0
    test_set = _neurofinder_folder(tmp_path / "b", with_regions=False)
    assert read_neurofinder(test_set).rois is None
    no_info = _neurofinder_folder(tmp_path / "c", with_info=False)
    with pytest.raises(DataError, match="info.json"):
        read_neurofinder(no_info)


def test_thunder_folder(tmp_path):
    (tmp_path / "conf.json").write_text(json.dumps({"dims": [10, 12], "dtype": "int16"}))
    for i, frame in enumerate(MOVIE.astype("<i2")):
        frame.tofile(tmp_path / f"image-{i:05d}.bin")
    movie = read_thunder(tmp_path)
    np.testing.assert_array_equal(movie.frames(0, 7), MOVIE.astype(np.int16))
    (tmp_path / "image-00003.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="image-00003.bin"):
        read_thunder(tmp_path)


def test_real_thunder_mouse_sample(real_data_dir):
    movie = open_movie(real_data_dir / "thunder_mouse")
    assert movie.shape == (500, 64, 64) and movie.dtype == np.int16
    x = movie.frames(0, 500)
    assert (int(x.min()), int(x.max())) == (0, 909)  # README: min 0, max 909, mean 80.737
    assert float(x.mean(dtype=np.float64)) == pytest.approx(80.737, abs=1e-3)


def test_real_allen_sample(real_data_dir):
    movie = read_allen(real_data_dir / "792757260_test_data.h5", key="input_frames")
    assert movie.shape == (100, 100, 100) and movie.dtype == np.int16 and movie.rate_hz == 30.0
    x = movie.frames(0, 100)
    assert (int(x.min()), int(x.max())) == (93, 4621)  # README: min 93, max 4621, mean 263.922
    assert float(x.mean(dtype=np.float64)) == pytest.approx(263.922, abs=1e-3)
