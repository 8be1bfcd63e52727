"""Load the generated and reference sets for evaluation: a shard folder (index.json) or a folder of movies.

A set is a list of clips in source units (ADU) with one calibration per clip, so metrics can work in photon
units. Calibration comes, in order, from the folder's ``samples.json`` (written by ``jobs/sample.py``), the
shard index's per-source record, the movie file's own metadata, the reference set (for generated movies, which
are meant to be in the reference's units), or a photon-transfer estimate on the movie itself.

Data without a photon calibration (``prepare_data source.calibration=none``, or ``{"calibration": "none"}`` in
``samples.json``) is evaluated in raw units, the source's own: its calibration has ``units="raw"`` and maps stored
values to source values; gain-based metrics are then not applicable.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cadiff.data.noise import estimate_photon_transfer
from cadiff.data.shards import iter_shard, read_index, split_shards
from cadiff.data.sources.hdf5 import read_hdf5
from cadiff.data.sources.tiff import read_tiff
from cadiff.errors import DataError

log = logging.getLogger(__name__)

MOVIE_SUFFIXES = (".tif", ".tiff", ".h5", ".hdf5")
CALIBRATION_FILE = "samples.json"
INDEX_FILE = "index.json"
# jobs/export.py's manifest (cadiff/data/export.py MANIFEST_NAME) and the folder of its TIFF movies + truth .npz
EXPORT_MANIFEST = "export.json"
EXPORT_MOVIES = "tiff"
# Calibration records that carry a frame rate someone wrote down (a TIFF without one gets a reader default)
RECORDED_ORIGINS = (CALIBRATION_FILE, "index")
# Frames used to estimate an unknown calibration: photon transfer converges long before this on 64x64 fields.
MAX_CALIBRATION_FRAMES = 1000


@dataclass(frozen=True)
class Calibration:
    """Affine camera model of a source: adu = gain * photons + offset (plus read noise).

    ``units="raw"`` (no photon scale, :meth:`raw`): the same affine map takes stored values to the source's own
    units, ``source = zero + step * stored`` with ``gain = 1 / step`` and ``offset = -zero / step``.
    """

    gain: float
    offset: float
    read_noise: float | None = None
    rate_hz: float | None = None
    origin: str = "file"  # samples.json | index | metadata | reference | estimated
    units: str = "photons"  # photons | raw

    @classmethod
    def raw(cls, zero: float = 0.0, step: float = 1.0, rate_hz: float | None = None, origin: str = "file") -> Calibration:
        """Raw units: values ``zero + step * stored`` in the source's own units (identity by default)."""
        return cls(gain=1.0 / float(step), offset=-float(zero) / float(step), rate_hz=rate_hz, origin=origin, units="raw")

    def to_units(self, adu: np.ndarray) -> np.ndarray:
        """Stored values -> photon units, or the source's own units for raw units."""
        return (np.asarray(adu, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.gain)

    def same_camera(self, other: Calibration) -> bool:
        return self.units == other.units and math.isclose(self.gain, other.gain, rel_tol=1e-6) and math.isclose(
            self.offset, other.offset, rel_tol=1e-6, abs_tol=1e-6
        )

    def describe(self) -> dict[str, Any]:
        """JSON-ready record; a raw-unit calibration has no gain or offset to show (``units: raw``)."""
        if self.units == "raw":
            return {"units": "raw", "gain": None, "offset": None, "rate_hz": self.rate_hz, "origin": self.origin}
        return {"gain": self.gain, "offset": self.offset, "read_noise": self.read_noise, "rate_hz": self.rate_hz,
                "origin": self.origin}


@dataclass
class ClipSet:
    """Clips of one set in source units, each with its calibration (None until resolved)."""

    path: str
    kind: str  # shards | movies
    names: list[str] = field(default_factory=list)
    clips: list[np.ndarray] = field(default_factory=list)
    calibrations: list[Calibration | None] = field(default_factory=list)
    # the recording (movie file, shard source) each clip was cut from: the unit of the reference split-half
    recordings: list[str] = field(default_factory=list)

    @classmethod
    def from_reservoir(cls, root: str | Path, kind: str, reservoir: _Reservoir) -> ClipSet:
        """The set of the ``(name, clip, calibration, recording)`` items a :class:`_Reservoir` kept, in order."""
        items = reservoir.ordered()
        return cls(path=str(root), kind=kind, names=[n for n, _, _, _ in items], clips=[a for _, a, _, _ in items],
                   calibrations=[c for _, _, c, _ in items], recordings=[r for _, _, _, r in items])

    def in_units(self) -> list[np.ndarray]:
        """Every clip in the set's units (:meth:`units`); all calibrations must be resolved."""
        out = []
        for name, clip, cal in zip(self.names, self.clips, self.calibrations):
            if cal is None:
                raise DataError(f"{self.path}: clip {name} has no calibration; call resolve_calibration first")
            out.append(cal.to_units(clip))
        return out

    def photons(self) -> list[np.ndarray]:
        """Every clip in photon units (a raw-unit set has none)."""
        if self.units() != "photons":
            raise DataError(f"{self.path}: clips are in raw units (no photon calibration), expected photon units")
        return self.in_units()

    def units(self) -> str:
        """``photons`` or ``raw``, shared by every resolved clip (mixed units are a DataError)."""
        units = {c.units for c in self.calibrations if c is not None}
        if len(units) > 1:
            raise DataError(f"{self.path}: clips in both photon and raw units; expected one calibration kind per set")
        return units.pop() if units else "photons"

    def source_units_calibration(self) -> Calibration | None:
        """Calibration of movies written in this set's source units (generated movies borrow it): the common
        photon calibration, the identity for a raw-unit set, None when photon calibrations differ."""
        if self.calibrations and self.units() == "raw":
            return Calibration.raw(rate_hz=self.rate_hz(), origin="reference")
        return self.common_calibration()

    def common_calibration(self) -> Calibration | None:
        """The one calibration shared by every clip, or None when clips differ or some are unknown."""
        if not self.calibrations or any(c is None for c in self.calibrations):
            return None
        first = self.calibrations[0]
        return first if all(first.same_camera(c) for c in self.calibrations) else None

    def rate_hz(self, recorded_only: bool = False) -> float | None:
        """The one frame rate of the set, or None; ``recorded_only`` ignores rates a movie reader assumed."""
        rates = {
            c.rate_hz
            for c in self.calibrations
            if c is not None and c.rate_hz and (not recorded_only or c.origin in RECORDED_ORIGINS)
        }
        return rates.pop() if len(rates) == 1 else None

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: path, kind, clip count and the distinct calibrations used."""
        cals: list[dict[str, Any]] = []
        for c in self.calibrations:
            entry = c.describe() if c else None
            if entry not in cals:
                cals.append(entry)
        return {"path": self.path, "kind": self.kind, "num_clips": len(self.clips), "calibrations": cals}


class _Reservoir:
    """Uniform random sample of at most ``k`` items from a stream (Vitter's algorithm R), in stream order."""

    def __init__(self, k: int, rng: np.random.Generator):
        self.k, self.rng, self.seen = k, rng, 0
        self.items: list[tuple[int, Any]] = []

    def offer(self, make: Any) -> None:
        # ``make`` builds the item only when it is kept, so skipped tiles are never copied
        if len(self.items) < self.k:
            self.items.append((self.seen, make()))
        else:
            j = int(self.rng.integers(0, self.seen + 1))
            if j < self.k:
                self.items[j] = (self.seen, make())
        self.seen += 1

    def ordered(self) -> list[Any]:
        return [item for _, item in sorted(self.items, key=lambda p: p[0])]


def load_set(
    path: str | Path,
    split: str | None = None,
    max_clips: int = 64,
    seed: int = 0,
    clip_shape: tuple[int, int, int] | None = None,
    hdf5_key: str = "data",
    estimate_missing: bool = True,
) -> ClipSet:
    """Load up to ``max_clips`` clips (a seeded uniform sample) from a shard folder, a movie folder or a movie.

    Shard folders use ``split`` when the index has it, else every split. Movies are tiled into non-overlapping
    ``clip_shape`` clips when given, else each movie is one clip. Unknown calibrations are estimated from the
    movie when ``estimate_missing``, else left as None for :func:`resolve_calibration`.
    """
    root = Path(path)
    if max_clips < 1:
        raise DataError(f"max_clips = {max_clips}: expected >= 1")
    if not root.exists():
        raise DataError(f"{root}: no such file or folder, expected a shard folder or a folder of TIFF/HDF5 movies")
    rng = np.random.default_rng(seed)
    if root.is_dir() and (root / INDEX_FILE).is_file():
        clip_set = _load_shards(root, split, max_clips, rng)
    else:
        clip_set = _load_movies(root, max_clips, rng, clip_shape, hdf5_key, estimate_missing)
    if not clip_set.clips:
        raise DataError(f"{root}: no clips found, expected shards listed in {INDEX_FILE} or {'/'.join(MOVIE_SUFFIXES)} movies")
    log.info("loaded %d clips from %s (%s)", len(clip_set.clips), root, clip_set.kind)
    return clip_set


def _load_shards(root: Path, split: str | None, max_clips: int, rng: np.random.Generator) -> ClipSet:
    index = read_index(root)
    if index["kind"] != "clips":
        raise DataError(f"{root / INDEX_FILE}: kind '{index['kind']}' shards, expected clip shards or movies")
    splits = index.get("splits") or {}
    if split is not None and splits.get(split, {}).get("shards"):
        chosen = [split]
    else:
        chosen = sorted(splits)
        if split is not None:
            log.warning("%s: no split '%s' (has %s); using every split", root, split, chosen)
    sources = index.get("sources") or {}
    reservoir = _Reservoir(max_clips, rng)
    for name in chosen:
        for shard_path, _count in split_shards(root, index, name):
            for key, array, meta in iter_shard(shard_path, kind="clips"):
                cal = _index_calibration(root, sources, meta)
                recording = str(meta.get("recording", meta.get("source_id", meta.get("source"))))
                reservoir.offer(lambda a=array, k=f"{name}/{key}", c=cal, r=recording: (k, np.asarray(a), c, r))
    return ClipSet.from_reservoir(root, "shards", reservoir)


def _index_calibration(root: Path, sources: dict, meta: dict) -> Calibration | None:
    source = meta.get("source_id", meta.get("source"))
    record = sources.get(str(source)) if source is not None else None
    if record is None:
        raise DataError(f"{root / INDEX_FILE}: clip source {source!r} is not in 'sources', expected one of {sorted(sources)}")
    if record.get("calibration") == "none":
        raw = record["raw"]  # read_index checked it
        return Calibration.raw(raw["zero"], raw["step"], _opt_float(record.get("rate_hz")), "index")
    if record.get("gain") is None or record.get("offset") is None:
        return None
    return Calibration(
        gain=float(record["gain"]),
        offset=float(record["offset"]),
        read_noise=_opt_float(record.get("read_noise")),
        rate_hz=_opt_float(record.get("rate_hz")),
        origin="index",
    )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def movie_root(root: Path) -> Path:
    """Where a set's movies are: an export folder's (jobs/export.py) ``tiff/``, else ``root`` itself."""
    if root.is_dir() and (root / EXPORT_MANIFEST).is_file() and (root / EXPORT_MOVIES).is_dir():
        return root / EXPORT_MOVIES
    return root


def movie_files(root: Path) -> list[Path]:
    """TIFF/HDF5 movies in a folder (top level, sorted), or the file itself."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in MOVIE_SUFFIXES)


def read_calibration_file(root: Path) -> Calibration | None:
    """Calibration of a sample folder from ``samples.json`` ({gain, offset, read_noise, rate_hz}), if present."""
    folder = root if root.is_dir() else root.parent
    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc}), expected JSON with gain, offset, read_noise, rate_hz") from None
    if isinstance(record, dict) and isinstance(record.get("calibration"), dict):
        record = record["calibration"]  # jobs/sample.py's samples.json
    if isinstance(record, dict) and record.get("calibration") == "none":
        try:
            return Calibration.raw(rate_hz=_opt_float(record.get("rate_hz")), origin=CALIBRATION_FILE)
        except (TypeError, ValueError):
            raise DataError(f"{path}: rate_hz must be a number, got {record.get('rate_hz')!r}") from None
    if not isinstance(record, dict) or record.get("gain") is None or record.get("offset") is None:
        raise DataError(f"{path}: expected an object with numeric 'gain' and 'offset' (and optional read_noise, "
                        "rate_hz), or {\"calibration\": \"none\"} for movies in raw units")
    try:
        cal = Calibration(
            gain=float(record["gain"]),
            offset=float(record["offset"]),
            read_noise=_opt_float(record.get("read_noise")),
            rate_hz=_opt_float(record.get("rate_hz")),
            origin=CALIBRATION_FILE,
        )
    except (TypeError, ValueError):
        raise DataError(f"{path}: gain/offset/read_noise/rate_hz must be numbers, got {record}") from None
    if not cal.gain > 0:
        raise DataError(f"{path}: gain = {cal.gain}, expected > 0 (ADU per photon)")
    return cal


def read_movie(path: Path, hdf5_key: str = "data", rate_hz: float | None = None) -> Any:
    """Read one TIFF/HDF5 movie with the data layer; any failure becomes a DataError naming the file."""
    try:
        if path.suffix.lower() in (".h5", ".hdf5"):
            movie = read_hdf5(path, hdf5_key, rate_hz=rate_hz)
        else:
            movie = read_tiff(path, rate_hz=rate_hz)
    except DataError as exc:
        if str(path) in str(exc):
            raise
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - readers raise many types (OSError, KeyError, TiffFileError...)
        raise DataError(f"{path}: unreadable movie ({type(exc).__name__}: {exc}), expected a [T, H, W] TIFF/HDF5 movie") from None
    return movie


def _movie_calibration(movie: Any, path: Path, folder_cal: Calibration | None, estimate: bool) -> Calibration | None:
    if folder_cal is not None:
        return replace(folder_cal, rate_hz=folder_cal.rate_hz or movie.rate_hz)
    if movie.gain is not None and movie.offset is not None and movie.gain > 0:
        return Calibration(float(movie.gain), float(movie.offset), _opt_float(movie.read_noise), movie.rate_hz, "metadata")
    if not estimate:
        return None
    return _estimate(movie.frames(0, MAX_CALIBRATION_FRAMES), str(path), movie.rate_hz)


def _estimate(adu: np.ndarray, name: str, rate_hz: float | None) -> Calibration:
    try:
        pt = estimate_photon_transfer(np.asarray(adu))
    except (DataError, ValueError) as exc:
        raise DataError(f"{name}: no calibration given and photon transfer failed ({exc}); write {CALIBRATION_FILE} "
                        "with gain and offset next to the movies, or {\"calibration\": \"none\"} to compare them in "
                        "raw units") from None
    log.info("%s: no calibration given; photon transfer estimates gain %.4g offset %.4g", name, pt.gain, pt.offset)
    return Calibration(float(pt.gain), float(pt.offset), None, rate_hz, "estimated")


def tile_slices(shape: tuple[int, ...], clip_shape: tuple[int, int, int]) -> Iterator[tuple[slice, slice, slice]]:
    """Non-overlapping clip windows of a [T, H, W] movie; an axis shorter than the clip is taken whole."""
    steps = [min(c, s) for c, s in zip(clip_shape, shape)]
    for t in range(0, shape[0] - steps[0] + 1, steps[0]):
        for y in range(0, shape[1] - steps[1] + 1, steps[1]):
            for x in range(0, shape[2] - steps[2] + 1, steps[2]):
                yield slice(t, t + steps[0]), slice(y, y + steps[1]), slice(x, x + steps[2])


def _load_movies(
    root: Path,
    max_clips: int,
    rng: np.random.Generator,
    clip_shape: tuple[int, int, int] | None,
    hdf5_key: str,
    estimate: bool,
) -> ClipSet:
    root = movie_root(root)
    files = movie_files(root)
    if not files:
        raise DataError(f"{root}: no {'/'.join(MOVIE_SUFFIXES)} movies and no {INDEX_FILE}, expected a shard folder or movies")
    folder_cal = read_calibration_file(root)
    reservoir = _Reservoir(max_clips, rng)
    for path in files:
        movie = read_movie(path, hdf5_key, folder_cal.rate_hz if folder_cal else None)
        cal = _movie_calibration(movie, path, folder_cal, estimate)
        if clip_shape is None:
            reservoir.offer(lambda p=path, m=movie, c=cal: (p.name, m.frames(0, m.num_frames), c, p.name))
            continue
        for i, (t, y, x) in enumerate(tile_slices(movie.shape, clip_shape)):
            # movie data may be lazy (memmap, HDF5, per-frame files): read only the kept tile's frames
            reservoir.offer(
                lambda p=path, m=movie, t=t, y=y, x=x, c=cal, i=i: (f"{p.name}#{i}", np.array(m.frames(t.start, t.stop)[:, y, x]), c, p.name)
            )
    return ClipSet.from_reservoir(root, "movies", reservoir)


def resolve_calibration(clip_set: ClipSet, fallback: Calibration | None) -> ClipSet:
    """Fill unknown calibrations with ``fallback`` (the reference's), else estimate each clip's own."""
    cals: list[Calibration | None] = []
    for name, clip, cal in zip(clip_set.names, clip_set.clips, clip_set.calibrations):
        if cal is not None:
            cals.append(cal)
        elif fallback is not None:
            cals.append(replace(fallback, origin="reference"))
        else:
            log.warning(
                "%s: no calibration and no single reference calibration; estimating it from the clip itself, "
                "so its photon-transfer gain says little - write %s next to the movies", name, CALIBRATION_FILE
            )
            cals.append(_estimate(clip, f"{clip_set.path}/{name}", None))
    return replace(clip_set, calibrations=cals)


def center_crop(clip: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Central [T, H, W] window of a clip (frames from the start, to keep the causal first frame)."""
    t, h, w = shape
    y0 = (clip.shape[1] - h) // 2
    x0 = (clip.shape[2] - w) // 2
    return clip[:t, y0 : y0 + h, x0 : x0 + w]


def common_shape(*sets: ClipSet) -> tuple[int, int, int]:
    """The largest [T, H, W] every clip of every set contains."""
    shapes = np.array([c.shape for s in sets for c in s.clips])
    return tuple(int(v) for v in shapes.min(axis=0))


def crop_sets(shape: tuple[int, int, int], *sets: ClipSet) -> list[ClipSet]:
    """Copies of the sets with every clip cropped to ``shape``."""
    return [replace(s, clips=[center_crop(c, shape) for c in s.clips]) for s in sets]


def modal_shape(clip_set: ClipSet) -> tuple[int, int, int]:
    """The most common clip shape of a set (ties: the first seen)."""
    shapes = [tuple(int(v) for v in c.shape) for c in clip_set.clips]
    return max(dict.fromkeys(shapes), key=shapes.count)
