"""Downloads against a local HTTP server (127.0.0.1 only): pins, resume, truncation, URL/id rules, zip bombs."""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from cadiff.data.sources import allen, neurofinder
from cadiff.data.sources.download import (
    LOCK_FILE,
    Pin,
    _Expansion,
    fetch,
    load_manifest,
    manifest_pin,
    safe_extract_zip,
)
from cadiff.errors import ConfigError, DataError, DownloadError
from cadiff.testing.http_server import Handler, serve


@pytest.fixture()
def server():
    with serve() as url:
        yield url


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lock(cache: Path) -> dict:
    return json.loads((cache / LOCK_FILE).read_text())["files"]


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(dest.name + "*"))


# ---------------------------------------------------------------------------------------------------------
# pins: manifest, trust on first use


def test_first_download_is_pinned_and_a_changed_cache_file_is_refused(server, tmp_path):
    payload = _payload(300_000)
    Handler.files["/blob.bin"] = payload
    dest = tmp_path / "cache" / "blob.bin"
    assert fetch(f"{server}/blob.bin", dest, progress=False) == dest
    assert dest.read_bytes() == payload and _leftovers(dest) == ["blob.bin"]
    assert _lock(dest.parent)["blob.bin"]["size"] == 300_000
    assert _lock(dest.parent)["blob.bin"]["sha256"] == _sha(payload)
    n = len(Handler.log)
    fetch(f"{server}/blob.bin", dest, progress=False)  # verified against the lock file: no request at all
    assert len(Handler.log) == n
    damaged = bytearray(payload)
    damaged[1000] ^= 0xFF
    dest.write_bytes(bytes(damaged))
    with pytest.raises(DownloadError, match=rf"blob.bin: sha256 {_sha(bytes(damaged))} does not match "
                                            rf"{_sha(payload)} from .*{LOCK_FILE}.*cached file was kept"):
        fetch(f"{server}/blob.bin", dest, progress=False)
    assert dest.read_bytes() == bytes(damaged) and len(Handler.log) == n  # kept as it was, nothing fetched


def test_lock_mismatch_on_download_again_keeps_nothing(server, tmp_path):
    first, changed = _payload(50_000, 1), _payload(50_000, 2)
    Handler.files["/f.bin"] = first
    dest = tmp_path / "f.bin"
    fetch(f"{server}/f.bin", dest, progress=False)
    dest.unlink()
    Handler.files["/f.bin"] = changed  # same size, other bytes: the server's file is not the one first trusted
    with pytest.raises(DownloadError, match=rf"sha256 {_sha(changed)} does not match {_sha(first)}.*removed"):
        fetch(f"{server}/f.bin", dest, progress=False)
    assert _leftovers(dest) == [] and _lock(tmp_path)["f.bin"]["sha256"] == _sha(first)
    (tmp_path / LOCK_FILE).write_text('{"files": {"f.bin": {"size": 3}}}')  # hand-edited: never silently re-trusted
    with pytest.raises(DownloadError, match=rf"{LOCK_FILE}: unreadable download lock file .*lacks size or sha256"):
        fetch(f"{server}/f.bin", dest, progress=False)


def test_manifest_pin_checksum_and_size_mismatch(server, tmp_path):
    payload = _payload(40_000, 3)
    Handler.files["/m.bin"] = payload
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=rf"m.bin.part: sha256 {_sha(payload)} does not match {wrong} from manifest X"):
        fetch(f"{server}/m.bin", tmp_path / "m.bin", Pin("manifest X", 40_000, wrong), progress=False)
    assert _leftovers(tmp_path / "m.bin") == []
    n = len(Handler.log)
    with pytest.raises(DownloadError, match="server has 40000 bytes, expected 39999 from manifest X"):
        fetch(f"{server}/m.bin", tmp_path / "m.bin", Pin("manifest X", 39_999), progress=False)
    assert len(Handler.log) == n + 1 and _leftovers(tmp_path / "m.bin") == []  # refused before the body
    md5 = hashlib.md5(payload).hexdigest()
    fetch(f"{server}/m.bin", tmp_path / "m.bin", Pin("manifest X", 40_000, md5=md5), progress=False)
    assert (tmp_path / "m.bin").read_bytes() == payload
    assert not (tmp_path / LOCK_FILE).exists()  # a pinned digest needs no trust-on-first-use record


def test_packaged_manifest_pins_nothing_it_cannot_cite():
    manifest = load_manifest()
    assert {"neurofinder", "allen"} <= set(manifest)
    assert "neurofinder.00.00.zip" in manifest["neurofinder"] and "ophys_experiment_501940850.h5" in manifest["allen"]
    names = [n for n in manifest["neurofinder"]]
    assert all(neurofinder.ID_PATTERN.fullmatch(n[len("neurofinder."):-len(".zip")]) for n in names)
    raw = json.loads(Path(neurofinder.__file__).with_name("manifest.json").read_text())
    for source in raw["sources"].values():
        assert source["checked"], "every source lists what was searched for published values"
        for entry in source["files"].values():
            assert entry["sha256"] is None or entry.get("source"), "a pinned value must cite its source"
            assert entry["sha256"] is not None or entry["why"]
    assert manifest_pin("neurofinder", "neurofinder.00.00.zip") is None  # no value: trust on first use


# ---------------------------------------------------------------------------------------------------------
# completeness and resume


def test_early_close_with_content_length_keeps_part_and_resumes(server, tmp_path):
    payload = _payload(50_000, 4)
    Handler.files["/f.bin"] = payload
    Handler.faults["/f.bin"] = {"cut": 20_000}
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match=r"got 20000 of 50000 bytes \(connection closed early\); re-run to resume"):
        fetch(f"{server}/f.bin", dest, progress=False)
    assert not dest.exists() and dest.with_name("f.bin.part").stat().st_size == 20_000
    Handler.faults.clear()
    fetch(f"{server}/f.bin", dest, progress=False)
    assert dest.read_bytes() == payload and _leftovers(dest) == ["f.bin"]
    assert Handler.log[-1] == ("/f.bin", "bytes=20000-", f'"{hashlib.md5(payload).hexdigest()}"')
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server}/missing.bin", tmp_path / "m.bin", progress=False)


def test_early_close_without_content_length_never_enters_the_cache(server, tmp_path):
    payload = _payload(50_000, 5)
    Handler.files["/n.bin"] = payload
    dest = tmp_path / "n.bin"
    for fault in ({"no_length": True, "cut": 20_000}, {"no_length": True}):  # cut or whole: the client cannot tell
        Handler.faults["/n.bin"] = fault
        with pytest.raises(DownloadError, match=r"sent no length .* refusing to cache it \(\d+ bytes discarded\)"):
            fetch(f"{server}/n.bin", dest, progress=False)
        assert _leftovers(dest) == [] and not (tmp_path / LOCK_FILE).exists()
    Handler.faults["/n.bin"] = {"no_length": True, "cut": 20_000}
    with pytest.raises(DownloadError, match="got 20000 of 50000 bytes"):  # a pinned size tells the cut
        fetch(f"{server}/n.bin", dest, Pin("manifest", 50_000), progress=False)
    assert not dest.exists()
    Handler.faults["/n.bin"] = {"no_length": True}
    fetch(f"{server}/n.bin", dest, Pin("manifest", 50_000), progress=False)
    assert dest.read_bytes() == payload


def test_chunked_body_is_complete_only_with_its_last_chunk(server, tmp_path):
    payload = _payload(30_000, 6)
    Handler.files["/c.bin"] = payload
    Handler.faults["/c.bin"] = {"chunked": True, "cut": 12_288}
    dest = tmp_path / "c.bin"
    with pytest.raises(DownloadError, match=r"c.bin stopped after \d+ bytes \(IncompleteRead"):
        fetch(f"{server}/c.bin", dest, progress=False)
    assert not dest.exists()
    Handler.faults["/c.bin"] = {"chunked": True, "ignore_range": True}
    fetch(f"{server}/c.bin", dest, progress=False)
    assert dest.read_bytes() == payload and _lock(tmp_path)["c.bin"]["size"] == 30_000


def test_if_range_restarts_a_changed_file_from_zero(server, tmp_path):
    old, new = _payload(60_000, 7), _payload(70_000, 8)
    Handler.files["/r.bin"] = old
    Handler.faults["/r.bin"] = {"cut": 25_000}
    dest = tmp_path / "r.bin"
    with pytest.raises(DownloadError, match="re-run to resume"):
        fetch(f"{server}/r.bin", dest, progress=False)
    Handler.files["/r.bin"], Handler.faults = new, {}  # the file changed on the server meanwhile
    fetch(f"{server}/r.bin", dest, progress=False)
    assert Handler.log[-1] == ("/r.bin", "bytes=25000-", f'"{hashlib.md5(old).hexdigest()}"')
    assert dest.read_bytes() == new  # the 200 answer replaced the old bytes: no splice of two versions


def test_resume_edge_cases_416_and_parts_without_record(server, tmp_path):
    payload = _payload(10_000, 9)
    Handler.files["/e.bin"] = payload
    dest = tmp_path / "e.bin"
    part, meta = tmp_path / "e.bin.part", tmp_path / "e.bin.part.json"
    part.write_bytes(payload)  # a download that ended right before its rename
    meta.write_text(json.dumps({"url": f"{server}/e.bin", "validator": f'"{hashlib.md5(payload).hexdigest()}"'}))
    fetch(f"{server}/e.bin", dest, progress=False)
    assert dest.read_bytes() == payload and Handler.log[-1][1] == "bytes=10000-"  # answered 416: nothing to add
    dest.unlink()
    (tmp_path / LOCK_FILE).unlink()
    part.write_bytes(b"garbage from an older cadiff")  # no resume record: never continued
    fetch(f"{server}/e.bin", dest, progress=False)
    assert dest.read_bytes() == payload and Handler.log[-1][1] is None and _leftovers(dest) == ["e.bin"]


# ---------------------------------------------------------------------------------------------------------
# URL and id rules


def test_scheme_and_host_refusal(server, tmp_path):
    from cadiff.config import compose

    for url in ("file:///etc/passwd", "ftp://example.org/a.zip", "http://example.org/a.zip"):
        with pytest.raises(DownloadError, match="expected an https:// URL"):
            fetch(url, tmp_path / "x.bin", progress=False)
    with pytest.raises(ConfigError, match=r"'source.base_url' = 'file:///tmp'.*scheme file:// is refused"):
        neurofinder.download(["00.00"], tmp_path / "cache", base_url="file:///tmp", progress=False)
    with pytest.raises(ConfigError, match=r"'source.base_url' = 'http://example.org'.*host 'example.org' is refused"):
        compose("prepare_data", ["source=allen", "source.base_url=http://example.org"])
    for target, message in (("http://example.org/a.zip", r"redirected to 'http://example.org/a.zip'; expected an https"),
                            ("file:///etc/passwd", r"HTTP 302 .*Redirection to url 'file:///etc/passwd' is not allowed")):
        Handler.faults["/hop.bin"] = {"redirect": target}
        with pytest.raises(DownloadError, match=message):
            fetch(f"{server}/hop.bin", tmp_path / "hop.bin", progress=False)
    assert [path for path, *_ in Handler.log] == ["/hop.bin", "/hop.bin"]  # the redirect was never followed
    assert _leftovers(tmp_path / "hop.bin") == [] and not (tmp_path / "cache").exists()


def test_id_pattern_refusal(server, tmp_path):
    from cadiff.config import compose

    with pytest.raises(ConfigError, match=r"'source.ids' = \['\.\./evil'\]: expected .* 00\.00 or 00\.00\.test"):
        compose("prepare_data", ["source=neurofinder", "source.ids=[../evil]"])
    with pytest.raises(ConfigError, match=r"'source.ids' = \['12a'\]: expected .* like 501940850"):
        compose("prepare_data", ["source=allen", "source.ids=[12a]"])
    with pytest.raises(ConfigError, match="non-empty list"):
        allen.check_ids([])
    assert neurofinder.check_ids([10.1, "00.00.test"]) == ["10.10", "00.00.test"]  # the CLI may give a float
    with pytest.raises(ConfigError, match="not an id: '../../x'"):
        neurofinder.download(["../../x"], tmp_path / "c", base_url=server, progress=False)
    with pytest.raises(ConfigError, match="not an id: '1/2'"):
        allen.download(["1/2"], tmp_path / "c", base_url=server, progress=False)
    assert Handler.log == [] and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------------
# zip extraction


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_bomb_ratio_and_total_cap(tmp_path):
    bomb = _zip(tmp_path / "bomb.zip", {"a/zeros.tiff": bytes(20_000_000)})  # ~20 KB on disk, ~1000x
    with pytest.raises(DataError, match=r"bomb.zip: declares 20000000 bytes from \d+ \(\d+x\), over "
                                        r"source.zip_max_ratio=200: a zip bomb"):
        safe_extract_zip(bomb, tmp_path / "out")
    plain = _zip(tmp_path / "plain.zip", {"a/x.bin": _payload(5_000), "a/y.bin": _payload(5_000, 1)})
    with pytest.raises(DataError, match=r"plain.zip: declares 10000 bytes, over the cap of 9999 bytes "
                                        r"\(9.31e-06 GiB, source.zip_max_total_gib\)"):
        safe_extract_zip(plain, tmp_path / "out", max_total_bytes=9_999)
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())
    out = safe_extract_zip(plain, tmp_path / "out", max_total_bytes=10_000)
    assert (out / "a" / "y.bin").stat().st_size == 5_000


def _understate_size(archive: Path, name: str, declared: int) -> None:
    """Rewrite the local and central headers of ``name`` to declare ``declared`` uncompressed bytes."""
    data = bytearray(archive.read_bytes())
    encoded = name.encode()
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            name_at = at + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at:name_at + len(encoded)] == encoded:
                struct.pack_into("<I", data, at + size_at, declared)
            at = data.find(signature, at + 4)
    archive.write_bytes(bytes(data))


def test_zip_headers_that_lie_are_caught_while_extracting(tmp_path):
    archive = _zip(tmp_path / "liar.zip", {"d/big.bin": bytes(2_000_000)})
    _understate_size(archive, "d/big.bin", 1_000)  # headers pass the ratio check; the data does not match them
    assert zipfile.ZipFile(archive).getinfo("d/big.bin").file_size == 1_000
    with pytest.raises(DataError, match=r"liar.zip: member 'd/big.bin' is corrupt or unsupported \(Bad CRC-32"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())
    budget = _Expansion(archive, max_total_bytes=10**9, max_ratio=1e9)  # and the writer's own count
    info = zipfile.ZipInfo("d/big.bin")
    info.file_size = 1_000
    with pytest.raises(DataError, match="expands beyond the 1000 bytes its header declares"):
        budget.take(1_024, 1_024, info)


def test_safe_extract_rejects_traversal_and_bad_zip(tmp_path):
    evil = _zip(tmp_path / "evil.zip", {"ok/file.txt": b"fine", "../../escape.txt": b"bad"})
    with pytest.raises(DataError, match=r"evil.zip.*unsafe member path"):
        safe_extract_zip(evil, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.txt").exists()
    absolute = _zip(tmp_path / "abs.zip", {"/etc/passwd_copy": b"bad"})
    with pytest.raises(DataError, match="unsafe"):
        safe_extract_zip(absolute, tmp_path / "out2")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match=r"broken.zip.*not a readable zip"):
        safe_extract_zip(broken, tmp_path / "out3")
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no half-extracted temp folders


# ---------------------------------------------------------------------------------------------------------
# the sources end to end


def _zip_neurofinder(dataset_id: str, frames: np.ndarray, tmp: Path) -> bytes:
    src = tmp / "build" / f"neurofinder.{dataset_id}"
    (src / "images").mkdir(parents=True)
    for i, frame in enumerate(frames):
        tifffile.imwrite(src / "images" / f"image{i:05d}.tiff", frame)
    (src / "info.json").write_text(json.dumps({"rate-hz": 8.0}))
    (src / "regions").mkdir()
    (src / "regions" / "regions.json").write_text(json.dumps([{"coordinates": [[0, 0], [0, 1]]}]))
    archive = tmp / "build" / f"neurofinder.{dataset_id}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent).as_posix())
    return archive.read_bytes()


def _h5_bytes(data: np.ndarray, path: Path) -> bytes:
    with h5py.File(path, "w") as f:
        f["data"] = data
    return path.read_bytes()


def test_neurofinder_download_extract_read(server, tmp_path):
    frames = np.random.default_rng(1).integers(0, 3000, size=(6, 16, 12)).astype(np.uint16)
    Handler.files["/neurofinder.99.00.zip"] = _zip_neurofinder("99.00", frames, tmp_path)
    cache = tmp_path / "cache"
    folders = neurofinder.download(["99.00"], cache, base_url=server, progress=False)
    movie = neurofinder.read_neurofinder(folders[0])
    np.testing.assert_array_equal(movie.frames(0, 6), frames)
    assert movie.rate_hz == 8.0 and movie.rois.shape == (1, 16, 12)
    assert set(_lock(cache)) == {"neurofinder.99.00.zip"} and not (cache / ".cadiff.lock").exists()
    n = len(Handler.log)
    assert neurofinder.download(["99.00"], cache, base_url=server, progress=False) == folders
    assert len(Handler.log) == n  # archive verified against the lock file, extraction complete: nothing fetched


def test_allen_download_and_lazy_read(server, tmp_path):
    data = np.random.default_rng(2).integers(0, 4000, size=(9, 20, 20)).astype(np.uint16)
    Handler.files["/ophys_experiment_123.h5"] = _h5_bytes(data, tmp_path / "src.h5")
    paths = allen.download([123], tmp_path / "cache", base_url=server, progress=False)
    movie = allen.read_allen(paths[0])
    assert movie.rate_hz == allen.FRAME_RATE_HZ and movie.shape == (9, 20, 20)
    np.testing.assert_array_equal(movie.frames(2, 5), data[2:5])
    assert allen.movie_url("5", None).endswith("/visual-coding-2p/ophys_movies/ophys_experiment_5.h5")


def test_prepare_data_from_neurofinder_and_allen_archives(server, tmp_path):
    from cadiff.config import compose
    from cadiff.data.prepare import prepare_data
    from cadiff.data.shards import read_index
    from cadiff.data.simulate import simulate_movie

    for i, dataset_id in enumerate(["99.00", "99.01"]):
        movie = simulate_movie(frames=40, height=32, width=32, seed=i)[0].data
        Handler.files[f"/neurofinder.{dataset_id}.zip"] = _zip_neurofinder(dataset_id, movie, tmp_path / str(i))
        movie = simulate_movie(frames=40, height=32, width=32, seed=10 + i)[0].data
        Handler.files[f"/ophys_experiment_{700 + i}.h5"] = _h5_bytes(movie, tmp_path / f"{700 + i}.h5")
    common = [f"source.base_url={server}", f"source.cache_dir={tmp_path / 'cache'}", "clip.frames=17",
              "clip.height=32", "clip.width=32"]
    nf = prepare_data(compose("prepare_data", ["source=neurofinder", "source.ids=[99.00,99.01]",
                                               f"out={tmp_path / 'nf'}", *common]))
    assert (nf["num_train"], nf["num_val"]) == (2, 2)
    assert set(read_index(tmp_path / "nf")["sources"]) == {"neurofinder-99-00", "neurofinder-99-01"}
    assert read_index(tmp_path / "nf")["sources"]["neurofinder-99-00"]["rate_hz"] == 8.0
    al = prepare_data(compose("prepare_data", ["source=allen", "source.ids=[700,701]", f"out={tmp_path / 'al'}",
                                               *common]))
    assert (al["num_train"], al["num_val"]) == (2, 2) and al["sources"]["allen-700"]["gain"] > 0
    with pytest.raises(DataError, match=r"over the cap of 10737 bytes \(1e-05 GiB, source.zip_max_total_gib\)"):
        prepare_data(compose("prepare_data", ["source=neurofinder", "source.ids=[99.00]", "source.zip_max_total_gib=1e-5",
                                              f"source.cache_dir={tmp_path / 'cache2'}", f"source.base_url={server}",
                                              f"out={tmp_path / 'nf2'}"]))
