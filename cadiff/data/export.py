"""jobs/export.py: simulated movies with their ground truth, in the formats analysis tools read.

Movie ``i`` is the one ``prepare_data`` makes from the same ``source`` settings (seed ``source.seed + i``, named
``sim-<i>``), so an analysis of the export can be scored against the truth and set beside models trained on the
shards. Layout of ``out`` (``formats`` picks the folders):

    export.json               manifest: cadiff version, source settings, per movie: shape, rate, calibration, files
    tiff/<id>.tif             ImageJ TIFF, uint16 ADU, frame interval in its metadata
    tiff/<id>.npz             the ground truth (below)
    nwb/<id>.nwb              TwoPhotonSeries (calibration as unit 'photons' conversion/offset), the neurons as a
                              PlaneSegmentation, clean traces and spike counts as RoiResponseSeries
    suite2p/<id>/<id>.tif     one folder per movie, because suite2p joins every TIFF of a folder into one recording
                              (a hard link to tiff/<id>.tif when both are written)
    suite2p/<id>/db.json      suite2p's ``db`` for that folder: data_path, tiff_list, fs, nplanes, nchannels
    config.yaml, run.json     the run record

Ground truth (``.npz``): ``footprints`` [N, H, W] float32 (peak 1), ``rois`` [N, H, W] bool (footprint >= 0.3),
``spikes`` [N, T] spike counts per frame, ``spike_neuron`` / ``spike_frame`` / ``spike_time_s`` one entry per spike
(the time is the start of its frame, ``frame / rate_hz``), ``traces`` [N, T] noise-free calcium (one spike peaks at
1), ``background`` [H, W] resting neuropil photons, ``shifts`` [T, 2] rigid motion (dy, dx), and the scalars
``rate_hz``, ``gain`` (ADU/photon), ``offset`` (ADU), ``read_noise`` (ADU). The NWB image_mask of a neuron is its
footprint inside its ROI and zero elsewhere, so ``weight > 0`` is the ROI and the weights are the footprint.

Movies are simulated and written one at a time; ``out`` appears only when complete (``atomic_dir``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cadiff import __version__
from cadiff.data.conditioning import TRUTH_ROIS_KEY
from cadiff.data.movie import Movie
from cadiff.data.simulate import GroundTruth, simulate_movie
from cadiff.data.sources.nwb import NWBMovie, write_nwb
from cadiff.data.sources.tiff import write_tiff
from cadiff.io import atomic_dir, atomic_path, write_json_atomic
from cadiff.runinfo import record_run

log = logging.getLogger(__name__)

MANIFEST_NAME = "export.json"
SUITE2P_DB_NAME = "db.json"


def simulate(src: Any, index: int) -> tuple[Movie, GroundTruth]:
    """Movie ``index`` of a simulator source, as ``prepare_data`` simulates it."""
    return simulate_movie(preset=src.preset, frames=src.frames, height=src.height, width=src.width,
                          num_neurons=src.num_neurons, seed=src.seed + index, rate_hz=src.rate_hz, return_clean=False)


def truth_arrays(movie: Movie, truth: GroundTruth) -> dict[str, np.ndarray]:
    """The ground truth as named arrays (the ``.npz`` contents; see the module docstring)."""
    neuron, frame = np.nonzero(truth.spikes)
    counts = truth.spikes[neuron, frame]
    spike_frame = np.repeat(frame, counts).astype(np.int64)
    return {
        "footprints": truth.footprints, TRUTH_ROIS_KEY: truth.rois, "spikes": truth.spikes, "traces": truth.traces,
        "spike_neuron": np.repeat(neuron, counts).astype(np.int64), "spike_frame": spike_frame,
        "spike_time_s": spike_frame / float(movie.rate_hz),
        "background": truth.background, "shifts": truth.shifts, "rate_hz": np.float64(movie.rate_hz),
        "gain": np.float64(truth.gain), "offset": np.float64(truth.offset), "read_noise": np.float64(truth.read_noise),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path


def nwb_movie(movie: Movie, truth: GroundTruth, provenance: dict[str, Any]) -> NWBMovie:
    """The movie, its calibration, its neurons and their traces for :func:`write_nwb`."""
    text = json.dumps(provenance, sort_keys=True)
    return NWBMovie(
        frames=np.asarray(movie.data), rate_hz=float(movie.rate_hz), gain=truth.gain, offset=truth.offset,
        description=f"simulated movie {provenance['movie']}: Poisson photon counts, gain {truth.gain} ADU/photon, "
                    f"offset {truth.offset} ADU, Gaussian read noise {truth.read_noise} ADU; provenance (JSON): {text}",
        origin="none: simulated by cadiff (cadiff/data/simulate.py)",
        rois=truth.footprints * truth.rois,
        roi_description="ground-truth neurons: image_mask is the footprint (peak 1) inside the ROI (footprint >= 0.3), "
                        "zero elsewhere",
        traces={
            "CleanTraces": (truth.traces, "n.a.", "noise-free calcium trace of each neuron: its spike counts "
                                                  "convolved with the calcium kernel, one spike peaks at 1"),
            "SpikeCounts": (truth.spikes, "spikes", "ground-truth spike count of each neuron in each frame"),
        },
    )


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` to ``dest`` (no second copy on disk); copy where the file system cannot link."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def write_suite2p_folder(folder: Path, final_folder: Path, name: str, frames: np.ndarray, rate_hz: float,
                         tiff: Path | None) -> None:
    """``folder/<name>.tif`` alone (suite2p reads every TIFF of its data_path as one recording) + ``db.json``."""
    folder.mkdir(parents=True)
    dest = folder / f"{name}.tif"
    if tiff is None:
        write_tiff(frames, dest, rate_hz)
    else:
        link_or_copy(tiff, dest)
    write_json_atomic(folder / SUITE2P_DB_NAME, {"data_path": [str(final_folder)], "tiff_list": [dest.name],
                                                "fs": float(rate_hz), "nplanes": 1, "nchannels": 1,
                                                "input_format": "tif"})


def export_movie(tmp: Path, final: Path, name: str, movie: Movie, truth: GroundTruth, formats: list[str],
                 provenance: dict[str, Any]) -> dict[str, Any]:
    """Write one movie in every format into ``tmp`` (to become ``final``); its manifest entry."""
    frames = np.asarray(movie.data)
    files: dict[str, str] = {}
    tiff = None
    if "tiff" in formats:
        tiff = write_tiff(frames, tmp / "tiff" / f"{name}.tif", movie.rate_hz)
        write_npz(tmp / "tiff" / f"{name}.npz", truth_arrays(movie, truth))
        files.update(tiff=f"tiff/{name}.tif", truth=f"tiff/{name}.npz")
    if "nwb" in formats:
        write_nwb(tmp / "nwb" / f"{name}.nwb", nwb_movie(movie, truth, provenance),
                  f"cadiff {__version__} jobs/export.py: simulated calcium-imaging movie with ground truth")
        files["nwb"] = f"nwb/{name}.nwb"
    if "suite2p" in formats:
        write_suite2p_folder(tmp / "suite2p" / name, final / "suite2p" / name, name, frames, movie.rate_hz, tiff)
        files["suite2p"] = f"suite2p/{name}"
    return {"id": name, "shape": list(movie.shape), "dtype": str(movie.dtype), "rate_hz": float(movie.rate_hz),
            "gain": truth.gain, "offset": truth.offset, "read_noise": truth.read_noise,
            "num_neurons": int(truth.spikes.shape[0]), "seed": provenance["seed"], "files": files}


def export_simulated(cfg: Any) -> tuple[str, str]:
    """Run jobs/export.py for an ``ExportConfig``: (summary, output folder)."""
    src, formats, final = cfg.source, list(cfg.formats), Path(cfg.out)
    settings = {k: src[k] for k in ("preset", "frames", "height", "width", "num_neurons", "rate_hz")}
    entries = []
    with atomic_dir(final, "export", cfg.overwrite) as tmp:
        for i in range(src.num_movies):
            name = f"sim-{i:03d}"
            movie, truth = simulate(src, i)
            provenance = {"cadiff_version": __version__, "movie": name, "seed": src.seed + i, **settings}
            entries.append(export_movie(tmp, final.resolve(), name, movie, truth, formats, provenance))
            log.info("%s: %s with %d neurons -> %s", name, movie.shape, entries[-1]["num_neurons"], sorted(entries[-1]["files"]))
        write_json_atomic(tmp / MANIFEST_NAME, {"cadiff_version": __version__, "source": settings, "formats": formats,
                                                "movies": entries})
        record_run(tmp, cfg, "export")
    t, h, w = entries[0]["shape"]
    return f"{len(entries)} movies {t}x{h}x{w} with ground truth ({', '.join(formats)})", str(final)
