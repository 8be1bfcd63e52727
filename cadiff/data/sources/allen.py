"""Allen Brain Observatory Visual Coding two-photon movies (``ophys_experiment_<id>.h5``): download and read.

The raw motion-corrected movies are public in the Allen open-data bucket
(https://registry.opendata.aws/allen-brain-observatory/):
``https://allen-brain-observatory.s3.us-west-2.amazonaws.com/visual-coding-2p/ophys_movies/ophys_experiment_<id>.h5``
with dataset ``data`` ``[T, 512, 512]`` uint16 at ~30 Hz (de Vries et al. 2020, Nature Neuroscience 23:138).
The brain-map API (``http://api.brain-map.org/api/v2/well_known_file_download/<file id>``) needs a separate
file id per experiment, so the bucket path is used instead. No allensdk (it does not install on current numpy).
"""

from __future__ import annotations

from pathlib import Path

from cadiff.data.movie import Movie
from cadiff.data.sources.download import fetch
from cadiff.data.sources.hdf5 import read_hdf5

BASE_URL = "https://allen-brain-observatory.s3.us-west-2.amazonaws.com/visual-coding-2p/ophys_movies"
FRAME_RATE_HZ = 30.0  # Visual Coding 2P acquisition rate (de Vries et al. 2020); the movie files carry none


def movie_url(experiment_id: str, base_url: str | None = None) -> str:
    return f"{(base_url or BASE_URL).rstrip('/')}/ophys_experiment_{experiment_id}.h5"


def download(ids: list[str], cache_dir: str | Path, base_url: str | None = None, progress: bool = True) -> list[Path]:
    """Download ``ophys_experiment_<id>.h5`` files into ``cache_dir`` (resumable); returns the file paths."""
    cache_dir = Path(cache_dir)
    return [fetch(movie_url(str(i), base_url), cache_dir / f"ophys_experiment_{i}.h5", progress=progress) for i in ids]


def read_allen(path: str | Path, key: str = "data", rate_hz: float | None = None) -> Movie:
    """Read an Allen ophys movie lazily (h5py); ``key="input_frames"`` reads the ophys_etl test sample."""
    movie = read_hdf5(path, key=key, rate_hz=rate_hz or FRAME_RATE_HZ, source=Path(path).stem)
    movie.meta["format"] = "allen"
    return movie
