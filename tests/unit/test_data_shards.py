"""WebDataset shards: bit-exact round trip, resume/skip, atomic writes, index validation, corrupt shards."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cadiff.data.shards import (
    IndexedShards,
    iter_shard,
    read_index,
    write_index,
    write_shards,
)
from cadiff.errors import DataError


def _samples(n, dtype=np.uint16, shape=(5, 6, 7), seed=0, prefix="rec"):
    rng = np.random.default_rng(seed)
    for i in range(n):
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        else:
            array = rng.standard_normal(shape).astype(dtype)
        yield f"{prefix}_t{i:04d}", array, {"source": "s0", "recording": prefix, "t0": i, "y0": 0, "x0": 0}


def _clip_index(root, infos, shape=(5, 6, 7), dtype="uint16"):
    return {"kind": "clips", "clip_shape": list(shape), "dtype": dtype,
            "splits": {"train": {"shards": infos, "num_clips": sum(i["count"] for i in infos)}},
            "sources": {"s0": {"gain": 2.0, "offset": 100.0, "read_noise": 0.0, "rate_hz": 10.0, "recording": "rec"}},
            "normalization": {"kind": "photon", "center": 0.0, "scale": 1.0}}


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_clip_round_trip_is_bit_exact(tmp_path, dtype):
    expected = list(_samples(10, dtype))
    infos = write_shards(iter(expected), tmp_path, "train", "clips", clips_per_shard=4)
    assert [i["count"] for i in infos] == [4, 4, 2]
    assert infos[0]["path"] == "train/clips-000000.tar"
    got = [s for info in infos for s in iter_shard(tmp_path / info["path"], "clips", (5, 6, 7))]
    assert [k for k, _, _ in got] == [k for k, _, _ in expected]
    for (_, a, m), (_, b, n) in zip(got, expected):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
        assert m == n
    write_index(tmp_path, _clip_index(tmp_path, infos, dtype=np.dtype(dtype).name))
    indexed = IndexedShards(tmp_path, "train")
    assert len(indexed) == 10
    np.testing.assert_array_equal(indexed[9][1], expected[9][1])
    assert indexed[3][2]["t0"] == 3


def test_latent_shards_float16_round_trip(tmp_path):
    expected = list(_samples(3, np.float16, shape=(4, 2, 3, 3)))
    infos = write_shards(iter(expected), tmp_path, "val", "latents", clips_per_shard=8)
    got = list(iter_shard(tmp_path / infos[0]["path"], "latents"))
    for (_, a, _), (_, b, _) in zip(got, expected):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, b)
    index = {"kind": "latents", "latent_shape": [4, 2, 3, 3], "dtype": "float16",
             "splits": {"val": {"shards": infos, "num_clips": 3}}, "sources": {},
             "channel_mean": [0.0] * 4, "channel_std": [1.0] * 4, "stage1": "outputs/train_ae/r1"}
    write_index(tmp_path, index)
    assert read_index(tmp_path)["kind"] == "latents"
    with pytest.raises(DataError, match="latent.npy"):
        list(iter_shard(tmp_path / infos[0]["path"], "clips"))


def test_rerun_skips_finished_shards_and_removes_stale(tmp_path):
    infos = write_shards(_samples(9), tmp_path, "train", "clips", clips_per_shard=3)
    paths = [tmp_path / i["path"] for i in infos]
    stamps = [p.stat().st_mtime_ns for p in paths]
    os.utime(paths[1], ns=(1, 1))
    assert write_shards(_samples(9), tmp_path, "train", "clips", clips_per_shard=3) == infos
    assert paths[1].stat().st_mtime_ns == 1  # untouched: skipped
    assert paths[0].stat().st_mtime_ns == stamps[0]
    write_shards(_samples(4), tmp_path, "train", "clips", clips_per_shard=3)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["clips-000000.tar", "clips-000001.tar"]


def test_interrupted_write_leaves_no_partial_shard(tmp_path):
    def failing():
        yield from _samples(5)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shards(failing(), tmp_path, "train", "clips", clips_per_shard=3)
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert names == ["clips-000000.tar"]  # the finished shard only: no temp file, no half shard


def test_bad_samples_are_rejected(tmp_path):
    with pytest.raises(DataError, match="no dots"):
        write_shards([("a.b", np.zeros((2, 2, 2), np.uint16), {})], tmp_path, "train")
    with pytest.raises(DataError, match="expected one of"):
        write_shards([("a", np.zeros((2, 2, 2), np.float64), {})], tmp_path, "train", kind="clips")
    mixed = [("a", np.zeros((2, 2, 2), np.uint16), {}), ("b", np.zeros((2, 3, 2), np.uint16), {})]
    with pytest.raises(DataError, match=r"sample b: shape \(2, 3, 2\)"):
        write_shards(mixed, tmp_path, "train")


def test_corrupt_and_truncated_shards_name_the_file(tmp_path):
    infos = write_shards(_samples(4), tmp_path, "train", "clips", clips_per_shard=4)
    path = tmp_path / infos[0]["path"]
    data = path.read_bytes()
    path.write_bytes(data[:6000])  # inside the third sample's array
    with pytest.raises(DataError, match=r"clips-000000.tar.*(corrupt|truncated)"):
        list(iter_shard(path))
    path.write_bytes(b"\x00garbage" * 700)
    with pytest.raises(DataError, match="clips-000000.tar"):
        list(iter_shard(path))
    with pytest.raises(DataError, match="clips-000000.tar"):
        IndexedShards._scan(path)


def test_wrong_clip_shape_names_shard(tmp_path):
    infos = write_shards(_samples(2, shape=(3, 6, 7)), tmp_path, "train", "clips")
    with pytest.raises(DataError, match=r"clips-000000.tar: sample 'rec_t0000' has shape \(3, 6, 7\), expected \(5, 6, 7\)"):
        list(iter_shard(tmp_path / infos[0]["path"], "clips", (5, 6, 7)))


def test_read_index_validation(tmp_path):
    with pytest.raises(DataError, match="index.json: missing"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_index(tmp_path)
    infos = write_shards(_samples(2), tmp_path, "train", "clips")
    good = _clip_index(tmp_path, infos)
    for key, value, match in [("kind", "frames", "'kind'"), ("clip_shape", [5, 6], "clip_shape"),
                              ("dtype", "float32", "'dtype'"), ("normalization", {"kind": "photon"}, "normalization")]:
        (tmp_path / "index.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(DataError, match=match):
            read_index(tmp_path)
    missing = {**good, "splits": {"train": {"shards": [{"path": "train/nope.tar", "count": 1}], "num_clips": 1}}}
    (tmp_path / "index.json").write_text(json.dumps(missing))
    with pytest.raises(DataError, match="nope.tar: shard listed"):
        read_index(tmp_path)
    write_index(tmp_path, good)
    assert read_index(tmp_path)["splits"]["train"]["num_clips"] == 2


def test_raw_unit_index_needs_the_raw_scales_of_every_source(tmp_path):
    infos = write_shards(_samples(2), tmp_path, "train", "clips")
    raw_source = {"calibration": "none", "gain": None, "offset": None, "rate_hz": 10.0,
                  "raw": {"center": 120.0, "scale": 9.0, "zero": 0.0, "step": 1.0, "noise_std": 4.0}}
    raw = {**_clip_index(tmp_path, infos), "sources": {"s0": raw_source},
           "normalization": {"kind": "raw", "center": 0.0, "scale": 1.0}}
    write_index(tmp_path, raw)
    assert read_index(tmp_path)["sources"]["s0"]["raw"]["scale"] == 9.0
    for sources, match in [({"s0": {**raw_source, "raw": None}}, r"source 's0' calibration: 'raw' = None: expected"),
                           ({"s0": {**raw_source, "raw": {**raw_source["raw"], "step": 0}}}, "'step' > 0")]:
        (tmp_path / "index.json").write_text(json.dumps({**raw, "sources": sources}))
        with pytest.raises(DataError, match=match):
            read_index(tmp_path)
    # a photon normalization needs a gain: a calibration-none source cannot hide in it
    (tmp_path / "index.json").write_text(json.dumps({**raw, "normalization": {"kind": "anscombe", "center": 0.0, "scale": 1.0}}))
    with pytest.raises(DataError, match=r"gain None, offset None: expected numeric 'gain' > 0"):
        read_index(tmp_path)
