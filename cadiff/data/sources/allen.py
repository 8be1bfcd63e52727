"""Allen Brain Observatory Visual Coding two-photon movies (``ophys_experiment_<id>.h5``): download and read.

The raw motion-corrected movies are public in the Allen open-data bucket
(https://registry.opendata.aws/allen-brain-observatory/):
``https://allen-brain-observatory.s3.us-west-2.amazonaws.com/visual-coding-2p/ophys_movies/ophys_experiment_<id>.h5``
with dataset ``data`` ``[T, 512, 512]`` uint16 at ~30 Hz (de Vries et al. 2020, Nature Neuroscience 23:138).
The brain-map API (``http://api.brain-map.org/api/v2/well_known_file_download/<file id>``) needs a separate
file id per experiment, so the bucket path is used instead. No allensdk (it does not install on current numpy).
No checksums are published for these files (``manifest.json`` says why): each is pinned by its first download.
"""

from __future__ import annotations

import re
from pathlib import Path

from cadiff.data.movie import Movie
from cadiff.data.sources.download import check_base_url, check_id_list, fetch, manifest_pin
from cadiff.data.sources.hdf5 import read_hdf5
from cadiff.io import folder_lock

BASE_URL = "https://allen-brain-observatory.s3.us-west-2.amazonaws.com/visual-coding-2p/ophys_movies"
FRAME_RATE_HZ = 30.0  # Visual Coding 2P acquisition rate (de Vries et al. 2020); the movie files carry none
ID_PATTERN = re.compile(r"\d{1,12}")  # ophys experiment ids are integers, e.g. 501940850


def check_ids(ids: list[object]) -> list[str]:
    """Experiment ids as digit strings (they become file names and URLs); else ConfigError."""
    return check_id_list(ids, ID_PATTERN, "501940850")


def movie_name(experiment_id: str) -> str:
    return f"ophys_experiment_{experiment_id}.h5"


def movie_url(experiment_id: str, base_url: str | None = None) -> str:
    return f"{(base_url or BASE_URL).rstrip('/')}/{movie_name(experiment_id)}"


def download(ids: list[object], cache_dir: str | Path, base_url: str | None = None, progress: bool = True) -> list[Path]:
    """Download ``ophys_experiment_<id>.h5`` files into ``cache_dir`` (resumable, verified); returns the paths."""
    check_base_url(base_url)
    ids = check_ids(ids)
    cache_dir = Path(cache_dir)
    with folder_lock(cache_dir, "source.cache_dir"):
        return [fetch(movie_url(i, base_url), cache_dir / movie_name(i), manifest_pin("allen", movie_name(i)),
                      progress=progress) for i in ids]


def read_allen(path: str | Path, key: str = "data", rate_hz: float | None = None) -> Movie:
    """Read an Allen ophys movie lazily (h5py); ``key="input_frames"`` reads the ophys_etl test sample."""
    movie = read_hdf5(path, key=key, rate_hz=rate_hz or FRAME_RATE_HZ, source=Path(path).stem)
    movie.meta["format"] = "allen"
    return movie
