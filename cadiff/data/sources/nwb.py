"""Neurodata Without Borders (NWB 2.x) optical physiology: read a TwoPhotonSeries / OnePhotonSeries lazily (local
file or remote DANDI asset), write movies with ROIs and traces as valid NWB files.

Axis order. NWB stores ``ImageSeries.data`` as ``[t, x, y]`` (core schema dims ``frame, x, y``) with ``x`` the
image column and ``y`` the row, as NeuroConv/roiextractors write it; an ``image_mask`` is ``[x, y]`` and a
``pixel_mask`` entry is ``(x, y, weight)``. cadiff movies are ``[T, H, W]`` (rows first, as every other reader
returns frames), so reading swaps the two spatial axes of each chunk and writing swaps them back: the same frames
read from an NWB file and from a TIFF are identical, and NWB -> cadiff -> NWB returns the file's array.

Reading streams: the series' HDF5 dataset stays on disk (or behind HTTP range requests, through ``remfile``, for
an ``http(s)://`` URL such as a DANDI asset's download URL) and :func:`cadiff.data.movie.read_frames` pulls one
time chunk per request. Frame rate: ``rate_hz`` when given, else the series' ``rate``, else the median interval
of its ``timestamps``. ROIs: the series' PlaneSegmentation (the one that lists the series as a reference image,
else the first on its imaging plane), ``image_mask`` or ``pixel_mask``, as ``Movie.rois`` ``[N, H, W]`` bool
(weight > 0). Calibration: a series in unit ``photons`` with ``conversion``/``offset`` (what :func:`write_nwb`
writes) gives ``Movie.gain = 1 / conversion`` and ``Movie.offset = -offset / conversion``, ADU as stored.
"""

from __future__ import annotations

import datetime as _dt
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import h5py
import numpy as np
import pynwb
from pynwb.ophys import (
    Fluorescence,
    ImageSegmentation,
    OnePhotonSeries,
    OpticalChannel,
    PlaneSegmentation,
    RoiResponseSeries,
    TwoPhotonSeries,
)

from cadiff import __version__
from cadiff.data.movie import LazyFrames, Movie
from cadiff.errors import DataError
from cadiff.io import atomic_path

log = logging.getLogger(__name__)

NWB_SUFFIXES = (".nwb",)
PHOTON_SERIES = (TwoPhotonSeries, OnePhotonSeries)
PHOTONS_UNIT = "photons"  # a series in this unit carries the ADU -> photon calibration in conversion/offset
IRREGULAR_TIMING = 0.05  # relative spread of frame intervals above which the timestamps are reported as irregular
MASK_CHUNK = 64  # image masks read per request


def is_url(location: str | Path) -> bool:
    return str(location).startswith(("http://", "https://"))


def location_name(location: str | Path) -> str:
    """A short name for a file or URL (a DANDI ``.../assets/<id>/download/`` URL gives ``<id>``)."""
    if not is_url(location):
        return Path(location).stem
    parts = [p for p in PurePosixPath(urlsplit(str(location)).path).parts if p not in ("/", "download")]
    return PurePosixPath(parts[-1]).stem if parts else urlsplit(str(location)).netloc


# ---------------------------------------------------------------------------------------------------------
# reading


class OpenNWB:
    """An open NWB file (local or remote): the pynwb ``NWBFile`` and what must stay open while it is read."""

    def __init__(self, location: str | Path) -> None:
        self.where = str(location)
        self._io: Any = None
        self._handles: list[Any] = []
        try:
            self._io = self._open(location)
            self.content = self._io.read()
        except BaseException as exc:
            self.close()
            if isinstance(exc, DataError) or not isinstance(exc, Exception):
                raise
            # pynwb, hdmf, h5py and remfile raise many types (TypeError, OSError, requests errors, bare Exception)
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{self.where}: not a readable NWB file ({detail}); expected an NWB 2.x file with a "
                            "TwoPhotonSeries or OnePhotonSeries") from None

    def _open(self, location: str | Path) -> Any:
        if not is_url(location):
            if not Path(location).is_file():
                raise DataError(f"{location}: no such NWB file (expected a local .nwb file or an http(s) URL)")
            return pynwb.NWBHDF5IO(str(location), mode="r", load_namespaces=True)
        import remfile

        remote = remfile.File(str(location))
        self._handles.append(remote)
        handle = h5py.File(remote, "r")
        self._handles.append(handle)
        return pynwb.NWBHDF5IO(file=handle, mode="r", load_namespaces=True)

    def close(self) -> None:
        if self._io is not None:
            self._io.close()
        for handle in reversed(self._handles):
            handle.close()
        self._io, self._handles = None, []


class NWBFrames(LazyFrames):
    """``[T, H, W]`` frames of an NWB ``[t, x, y]`` dataset: each request reads a time range, then swaps x and y."""

    def __init__(self, dataset: Any, owner: OpenNWB, describe: str) -> None:
        t, x, y = (int(s) for s in dataset.shape)
        super().__init__(self._read_one, t, (y, x), dataset.dtype, describe)
        self._dataset = dataset
        self._owner = owner  # keeps the file open as long as its frames are in use

    def _read_one(self, i: int) -> np.ndarray:
        return self._frames(np.array([i]))[0]

    def _frames(self, indices: np.ndarray) -> np.ndarray:
        """Frames at sorted-or-not ``indices`` as ``[len(indices), H, W]``: one contiguous or fancy HDF5 read."""
        if indices.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        if np.all(np.diff(indices) == 1):
            block = np.asarray(self._dataset[int(indices[0]): int(indices[-1]) + 1])
        else:
            unique, inverse = np.unique(indices, return_inverse=True)  # HDF5 point selections must increase
            block = np.asarray(self._dataset[unique.tolist()])[inverse]
        return np.ascontiguousarray(block.transpose(0, 2, 1))


def _series_labels(nwbfile: Any) -> dict[str, Any]:
    """Imaging series by name; a name used twice is labelled ``<parent>/<name>`` for each use."""
    found = [obj for obj in nwbfile.objects.values() if isinstance(obj, PHOTON_SERIES)]
    names = [s.name for s in found]
    return {(s.name if names.count(s.name) == 1 else f"{s.parent.name}/{s.name}"): s for s in found}


def select_series(nwbfile: Any, name: str | None, where: str) -> tuple[str, Any]:
    """The imaging series named ``name`` (``source.series``), or the only one; errors list what the file has."""
    series = _series_labels(nwbfile)
    labels = sorted(series)
    if not series:
        raise DataError(f"{where}: no TwoPhotonSeries or OnePhotonSeries; expected an optical-physiology NWB file "
                        "with its imaging data in acquisition or a processing module")
    if name is None:
        if len(series) > 1:
            raise DataError(f"{where}: {len(series)} imaging series {labels}; set source.series to one of them")
        return labels[0], series[labels[0]]
    matches = [label for label in labels if name in (label, label.rsplit("/", 1)[-1])]
    if len(matches) != 1:
        problem = "is ambiguous" if matches else "is not in the file"
        raise DataError(f"{where}: source.series={name!r} {problem}; expected one of {labels}")
    return matches[0], series[matches[0]]


def series_rate(series: Any, where: str) -> float | None:
    """Frames per second from ``rate``, else from the median interval of ``timestamps`` (None when neither)."""
    if series.rate:
        return float(series.rate)
    if series.timestamps is None:
        return None
    times = np.asarray(series.timestamps[:], dtype=np.float64)
    if times.size < 2:
        return None
    intervals = np.diff(times)
    if not (intervals > 0).all():
        bad = int(np.argmin(intervals > 0)) + 1
        raise DataError(f"{where}: timestamps do not increase at frame {bad} ({times[bad - 1]} -> {times[bad]} s); "
                        "expected one increasing time per frame (or set source.rate_hz)")
    median = float(np.median(intervals))
    spread = float(intervals.max() - intervals.min()) / median
    if spread > IRREGULAR_TIMING:
        log.warning("%s: irregular frame timing (intervals %.4g..%.4g s); using the median, %.4g Hz", where,
                    intervals.min(), intervals.max(), 1.0 / median)
    return 1.0 / median


def _calibration(series: Any) -> tuple[float | None, float | None]:
    """(gain ADU/photon, offset ADU) from a series in unit ``photons``; (None, None) otherwise."""
    if series.unit != PHOTONS_UNIT or not series.conversion or series.conversion <= 0:
        return None, None
    conversion = float(series.conversion)
    return 1.0 / conversion, -float(series.offset or 0.0) / conversion


def _plane_segmentation(nwbfile: Any, series: Any) -> Any | None:
    """The PlaneSegmentation of the series: one that names it as a reference image, else one on its plane."""
    plane = getattr(series, "imaging_plane", None)
    on_plane = sorted((obj for obj in nwbfile.objects.values() if isinstance(obj, PlaneSegmentation)
                       and plane is not None and obj.imaging_plane.object_id == plane.object_id), key=lambda p: p.name)
    referencing = [p for p in on_plane if any(r.object_id == series.object_id for r in (p.reference_images or ()))]
    chosen = (referencing or on_plane or [None])[0]
    if chosen is not None and len(on_plane) > 1:
        log.info("%s: ROIs from PlaneSegmentation '%s' (of %s)", series.name, chosen.name, [p.name for p in on_plane])
    return chosen


def _image_masks(column: Any, frame_shape: tuple[int, int], where: str) -> np.ndarray:
    h, w = frame_shape
    data = column.data
    if tuple(data.shape[1:]) != (w, h):
        raise DataError(f"{where}: image_mask of shape {tuple(data.shape)} does not match the frames; expected "
                        f"[rois, x, y] = [n, {w}, {h}]")
    masks = np.zeros((len(data), h, w), dtype=bool)
    for i in range(0, len(data), MASK_CHUNK):
        masks[i: i + MASK_CHUNK] = np.asarray(data[i: i + MASK_CHUNK]).transpose(0, 2, 1) > 0
    return masks


def _pixel_masks(column: Any, frame_shape: tuple[int, int], where: str) -> np.ndarray:
    h, w = frame_shape
    ends = np.asarray(column.data[:], dtype=np.int64)
    pixels = np.asarray(column.target.data[:])
    x, y, weight = (pixels[name] for name in pixels.dtype.names[:3])
    if pixels.size and (x.min() < 0 or y.min() < 0 or x.max() >= w or y.max() >= h):
        raise DataError(f"{where}: pixel_mask has pixels outside the {w}x{h} frame (x 0..{w - 1}, y 0..{h - 1} "
                        f"expected; got x {x.min()}..{x.max()}, y {y.min()}..{y.max()})")
    roi = np.repeat(np.arange(len(ends)), np.diff(np.concatenate([[0], ends])))
    masks = np.zeros((len(ends), h, w), dtype=bool)
    keep = weight > 0
    masks[roi[keep], y[keep].astype(np.int64), x[keep].astype(np.int64)] = True
    return masks


def read_rois(nwbfile: Any, series: Any, frame_shape: tuple[int, int], where: str) -> tuple[np.ndarray | None, dict]:
    """``([N, H, W] bool, description)`` of the series' PlaneSegmentation, or ``(None, {})`` when it has none."""
    segmentation = _plane_segmentation(nwbfile, series)
    if segmentation is None:
        return None, {}
    where = f"{where}: PlaneSegmentation '{segmentation.name}'"
    if "image_mask" in segmentation.colnames:
        kind, masks = "image_mask", _image_masks(segmentation["image_mask"], frame_shape, where)
    elif "pixel_mask" in segmentation.colnames:
        kind, masks = "pixel_mask", _pixel_masks(segmentation["pixel_mask"], frame_shape, where)
    else:
        log.warning("%s: no image_mask or pixel_mask (voxel masks are 3D); no ROIs read", where)
        return None, {}
    ids = [int(i) for i in segmentation.id.data[:]]
    return masks, {"plane_segmentation": segmentation.name, "mask": kind, "num_rois": len(ids), "ids": ids}


def read_nwb(location: str | Path, series: str | None = None, rate_hz: float | None = None,
             source: str | None = None) -> Movie:
    """Read an imaging series of a local NWB file or an ``http(s)://`` URL as a lazy ``[T, H, W]`` Movie."""
    handle = OpenNWB(location)
    try:
        label, chosen = select_series(handle.content, series, handle.where)
        where = f"{handle.where}:{label}"
        if chosen.external_file is not None:
            raise DataError(f"{where}: frames are in external files {list(chosen.external_file[:])}; read those with "
                            "source=tiff")
        shape = tuple(int(s) for s in chosen.data.shape)
        if len(shape) != 3:
            raise DataError(f"{where}: data of shape {shape}; expected a single-plane movie [t, x, y] (volumes "
                            "[t, x, y, z] are not supported)")
        rate = rate_hz or series_rate(chosen, where)
        if rate is None:
            raise DataError(f"{where}: no rate and fewer than two timestamps; set source.rate_hz")
        frames = NWBFrames(chosen.data, handle, where)
        rois, roi_info = read_rois(handle.content, chosen, frames.shape[1:], where)
        gain, offset = _calibration(chosen)
        meta = {"path": handle.where, "format": "nwb", "series": label, "series_type": type(chosen).__name__,
                "timing": "rate" if chosen.rate else "timestamps", "unit": chosen.unit, "rois": roi_info}
        return Movie(data=frames, rate_hz=float(rate), source=source or location_name(location), gain=gain,
                     offset=offset, rois=rois, meta=meta)
    except BaseException:
        handle.close()
        raise


# ---------------------------------------------------------------------------------------------------------
# writing


@dataclass
class NWBMovie:
    """What :func:`write_nwb` puts in a file: frames ``[T, H, W]`` in ADU (in the source's own units where gain and
    offset are None) and what is known about them."""

    frames: np.ndarray
    rate_hz: float
    description: str  # provenance, on the TwoPhotonSeries
    origin: str  # what made the frames (the Device description): no physical microscope for cadiff outputs
    gain: float | None = None  # ADU per photon: stored as conversion = 1/gain into unit 'photons'
    offset: float | None = None  # ADU at zero photons
    rois: np.ndarray | None = None  # [N, H, W] mask weights -> PlaneSegmentation image_mask
    roi_description: str = "regions of interest"
    # name -> ([N, T] values, unit, description): RoiResponseSeries of the ROIs in a Fluorescence container
    traces: dict[str, tuple[np.ndarray, str, str]] = field(default_factory=dict)


def _imaging_series(nwbfile: Any, movie: NWBMovie) -> TwoPhotonSeries:
    device = nwbfile.create_device(name="Microscope", description=movie.origin)
    channel = OpticalChannel(name="OpticalChannel", description="single channel", emission_lambda=np.nan)
    plane = nwbfile.create_imaging_plane(name="ImagingPlane", optical_channel=channel, device=device,
                                         description=movie.origin, excitation_lambda=np.nan, indicator="unknown",
                                         location="unknown", imaging_rate=float(movie.rate_hz))
    calibrated = movie.gain is not None and movie.offset is not None and movie.gain > 0
    _, h, w = movie.frames.shape
    series = TwoPhotonSeries(
        name="TwoPhotonSeries", data=np.ascontiguousarray(movie.frames.transpose(0, 2, 1)), imaging_plane=plane,
        rate=float(movie.rate_hz), starting_time=0.0, description=movie.description, dimension=[w, h],
        unit=PHOTONS_UNIT if calibrated else "n.a.",
        conversion=1.0 / movie.gain if calibrated else 1.0,
        offset=-movie.offset / movie.gain if calibrated else 0.0,
    )
    nwbfile.add_acquisition(series)
    return series


def _segmentation(nwbfile: Any, series: TwoPhotonSeries, movie: NWBMovie) -> None:
    ophys = nwbfile.create_processing_module(name="ophys", description="regions of interest and their traces")
    segmentation = ImageSegmentation(name="ImageSegmentation")
    ophys.add(segmentation)
    plane = segmentation.create_plane_segmentation(name="PlaneSegmentation", description=movie.roi_description,
                                                   imaging_plane=series.imaging_plane, reference_images=series)
    for mask in movie.rois:
        plane.add_roi(image_mask=np.asarray(mask, dtype=np.float32).T)
    if not movie.traces:
        return
    fluorescence = Fluorescence(name="Fluorescence")
    ophys.add(fluorescence)
    rois = list(range(len(movie.rois)))
    for name, (values, unit, description) in movie.traces.items():
        region = plane.create_roi_table_region(region=rois, description=f"the ROIs of {name}")
        fluorescence.add_roi_response_series(RoiResponseSeries(
            name=name, data=np.ascontiguousarray(np.asarray(values).T), rois=region, unit=unit,
            rate=float(movie.rate_hz), starting_time=0.0, description=description))


def write_nwb(path: str | Path, movie: NWBMovie, session_description: str) -> Path:
    """Write ``movie`` as one NWB file (TwoPhotonSeries + device + imaging plane, ROIs/traces when given), atomically."""
    path = Path(path)
    if movie.frames.ndim != 3:
        raise DataError(f"{path}: frames of shape {movie.frames.shape}; expected a movie [T, H, W]")
    nwbfile = pynwb.NWBFile(session_description=session_description, identifier=str(uuid.uuid4()),
                            session_start_time=_dt.datetime.now(_dt.timezone.utc),
                            source_script=f"cadiff {__version__}", source_script_file_name="cadiff")
    series = _imaging_series(nwbfile, movie)
    if movie.rois is not None and len(movie.rois):
        _segmentation(nwbfile, series, movie)
    with atomic_path(path, suffix=".nwb") as tmp, pynwb.NWBHDF5IO(str(tmp), mode="w") as io:
        io.write(nwbfile)
    return path
