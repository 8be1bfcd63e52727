"""Downloads against a local HTTP server (127.0.0.1 only): skip, resume, size check, safe zip extraction."""

from __future__ import annotations

import http.server
import json
import threading
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from cadiff.data.sources import allen, neurofinder
from cadiff.data.sources.download import fetch, safe_extract_zip
from cadiff.errors import DataError, DownloadError


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=N-`` support; records the requests it served."""

    log: list[tuple[str, str | None]] = []
    truncate_to: dict[str, int] = {}  # path -> bytes actually sent (simulates a dropped connection)

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        path = Path(self.translate_path(self.path))
        RangeHandler.log.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = RangeHandler.truncate_to.get(self.path)
        self.wfile.write(body if cut is None else body[:cut])


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.log, RangeHandler.truncate_to = [], {}
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_skips_complete_and_resumes_partial(server, tmp_path):
    root, url = server
    payload = np.random.default_rng(0).bytes(300_000)
    (root / "blob.bin").write_bytes(payload)
    dest = tmp_path / "cache" / "blob.bin"
    part = dest.with_name("blob.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[:120_000])  # an interrupted earlier download
    assert fetch(f"{url}/blob.bin", dest, progress=False) == dest
    assert dest.read_bytes() == payload and not part.exists()
    assert RangeHandler.log[-1] == ("/blob.bin", "bytes=120000-")
    n = len(RangeHandler.log)
    fetch(f"{url}/blob.bin", dest, progress=False)  # complete: no request at all
    assert len(RangeHandler.log) == n


def test_fetch_short_transfer_keeps_part_for_resume(server, tmp_path):
    root, url = server
    payload = b"x" * 50_000
    (root / "f.bin").write_bytes(payload)
    RangeHandler.truncate_to["/f.bin"] = 20_000
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="expected 50000"):
        fetch(f"{url}/f.bin", dest, progress=False)
    assert not dest.exists() and dest.with_name("f.bin.part").stat().st_size == 20_000
    RangeHandler.truncate_to.clear()
    fetch(f"{url}/f.bin", dest, progress=False)
    assert dest.read_bytes() == payload
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{url}/missing.bin", tmp_path / "m.bin", progress=False)


def _zip_neurofinder(root: Path, dataset_id: str, frames: np.ndarray) -> Path:
    src = root / "build" / f"neurofinder.{dataset_id}"
    (src / "images").mkdir(parents=True)
    for i, frame in enumerate(frames):
        tifffile.imwrite(src / "images" / f"image{i:05d}.tiff", frame)
    (src / "info.json").write_text(json.dumps({"rate-hz": 8.0}))
    (src / "regions").mkdir()
    (src / "regions" / "regions.json").write_text(json.dumps([{"coordinates": [[0, 0], [0, 1]]}]))
    archive = root / f"neurofinder.{dataset_id}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent).as_posix())
    return archive


def test_neurofinder_download_extract_read(server, tmp_path):
    root, url = server
    frames = np.random.default_rng(1).integers(0, 3000, size=(6, 16, 12)).astype(np.uint16)
    _zip_neurofinder(root, "99.00", frames)
    cache = tmp_path / "cache"
    folders = neurofinder.download(["99.00"], cache, base_url=url, progress=False)
    movie = neurofinder.read_neurofinder(folders[0])
    np.testing.assert_array_equal(movie.frames(0, 6), frames)
    assert movie.rate_hz == 8.0 and movie.rois.shape == (1, 16, 12)
    n = len(RangeHandler.log)
    assert neurofinder.download(["99.00"], cache, base_url=url, progress=False) == folders
    assert len(RangeHandler.log) == n  # archive and extraction both complete: nothing fetched


def test_allen_download_and_lazy_read(server, tmp_path):
    root, url = server
    data = np.random.default_rng(2).integers(0, 4000, size=(9, 20, 20)).astype(np.uint16)
    with h5py.File(root / "ophys_experiment_123.h5", "w") as f:
        f["data"] = data
    paths = allen.download(["123"], tmp_path / "cache", base_url=url, progress=False)
    movie = allen.read_allen(paths[0])
    assert movie.rate_hz == allen.FRAME_RATE_HZ and movie.shape == (9, 20, 20)
    np.testing.assert_array_equal(movie.frames(2, 5), data[2:5])
    assert allen.movie_url("5", None).endswith("/visual-coding-2p/ophys_movies/ophys_experiment_5.h5")


def test_safe_extract_rejects_traversal_and_bad_zip(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr("../../escape.txt", "bad")
    with pytest.raises(DataError, match=r"evil.zip.*unsafe member path"):
        safe_extract_zip(evil, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.txt").exists()
    absolute = tmp_path / "abs.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr("/etc/passwd_copy", "bad")
    with pytest.raises(DataError, match="unsafe"):
        safe_extract_zip(absolute, tmp_path / "out2")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match=r"broken.zip.*not a readable zip"):
        safe_extract_zip(broken, tmp_path / "out3")
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no half-extracted temp folders


def test_prepare_data_from_neurofinder_and_allen_archives(server, tmp_path):
    from cadiff.config import compose
    from cadiff.data.prepare import prepare_data
    from cadiff.data.shards import read_index
    from cadiff.data.simulate import simulate_movie

    root, url = server
    for i, dataset_id in enumerate(["99.00", "99.01"]):
        _zip_neurofinder(root, dataset_id, simulate_movie(frames=40, height=32, width=32, seed=i)[0].data)
        with h5py.File(root / f"ophys_experiment_{700 + i}.h5", "w") as f:
            f["data"] = simulate_movie(frames=40, height=32, width=32, seed=10 + i)[0].data
    common = [f"source.base_url={url}", f"source.cache_dir={tmp_path / 'cache'}", "clip.frames=17", "clip.height=32",
              "clip.width=32"]
    nf = prepare_data(compose("prepare_data", ["source=neurofinder", "source.ids=[99.00,99.01]",
                                               f"out={tmp_path / 'nf'}", *common]))
    assert (nf["num_train"], nf["num_val"]) == (2, 2)
    assert set(read_index(tmp_path / "nf")["sources"]) == {"neurofinder-99-00", "neurofinder-99-01"}
    assert read_index(tmp_path / "nf")["sources"]["neurofinder-99-00"]["rate_hz"] == 8.0
    al = prepare_data(compose("prepare_data", ["source=allen", "source.ids=[700,701]", f"out={tmp_path / 'al'}",
                                               *common]))
    assert (al["num_train"], al["num_val"]) == (2, 2) and al["sources"]["allen-700"]["gain"] > 0
