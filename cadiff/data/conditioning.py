"""Stage-2 conditions that travel with clips and latents: an ROI map and the mean photon flux.

- ROI map: the union of a movie's ROI masks (simulator ground truth, Neurofinder ``regions.json``, NWB plane
  segmentation), cropped like each clip. ``prepare_data`` stores it in the clip's ``meta.json`` as
  ``"roi_mask": {"shape": [H, W], "bits": <base64 of numpy.packbits>}`` (512 bytes for 64x64), so every
  reader of clip or latent shards carries it without a new shard member. ``encode_latents`` centre-crops it
  like the clip.
- Flux: the clip's mean photon count per pixel and frame, computed by ``encode_latents`` from the clip and its
  source calibration (``meta["flux"]``; absent for data in raw units, which has no photon scale).

Stage 2 sees both as extra channels appended to the latent ``[C, T, h, w]``: the ROI map averaged over
``s x s`` blocks onto the latent grid (the fraction of each latent pixel inside an ROI), and the flux as
``log10(flux)`` mapped to ``[0, 1]`` over :data:`LOG10_FLUX_RANGE` (the scale the time-step embedder expects).
A condition a clip does not have is a channel of NaN: the model reads it as "not given" (its null condition).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cadiff.errors import ConfigError, DataError

# Channel order of the conditions appended to a latent; the DiT reads them by these names.
CONDITIONS = ("roi_mask", "flux")
MASK_KEY, FLUX_KEY = CONDITIONS
# Mean photons per pixel per frame embedded over 1e-3..1e3: the two_photon preset (~0.16) and bright one-photon
# data (tens of photons) sit well inside; outside values are refused at sample time.
LOG10_FLUX_RANGE = (-3.0, 3.0)
MASK_SUFFIXES = (".npy", ".npz", ".tif", ".tiff", ".json")
# the array of ground-truth ROIs [N, H, W] in a jobs/export.py truth file (tiff/<id>.npz): export writes it, the
# sample job's mask= and the suite2p judge read it
TRUTH_ROIS_KEY = "rois"


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Bool map ``[H, W]`` -> JSON-able ``{"shape", "bits"}`` (packed bits, base64)."""
    m = np.asarray(mask, dtype=bool)
    return {"shape": list(m.shape), "bits": base64.b64encode(np.packbits(m).tobytes()).decode("ascii")}


def decode_mask(record: Any, where: str = "roi_mask") -> np.ndarray:
    """Inverse of :func:`encode_mask`; a malformed record raises DataError naming ``where``."""
    try:
        h, w = (int(v) for v in record["shape"])
        bits = np.frombuffer(base64.b64decode(record["bits"], validate=True), dtype=np.uint8)
        if h < 1 or w < 1 or bits.size != (h * w + 7) // 8:
            raise ValueError(f"{bits.size} bytes for shape {[h, w]}")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: expected {{'shape': [H, W], 'bits': base64 packbits}} ({exc})") from exc
    return np.unpackbits(bits, count=h * w).astype(bool).reshape(h, w)


def roi_map(rois: np.ndarray | None) -> np.ndarray | None:
    """Union ``[H, W]`` of ROI masks ``[N, H, W]`` (None without ROIs; an empty list gives an all-False map)."""
    return None if rois is None else np.asarray(rois, dtype=bool).any(axis=0)


def crop_meta_mask(meta: dict[str, Any], y0: int, x0: int, height: int, width: int, where: str) -> dict[str, Any]:
    """``meta`` with its ``roi_mask`` cropped to rows ``y0:y0+height`` and columns ``x0:x0+width``."""
    if MASK_KEY not in meta:
        return meta
    mask = decode_mask(meta[MASK_KEY], f"{where} {MASK_KEY}")
    if y0 + height > mask.shape[0] or x0 + width > mask.shape[1]:
        raise DataError(f"{where}: roi_mask of shape {mask.shape} is smaller than the crop {[height, width]} at {[y0, x0]}")
    return {**meta, MASK_KEY: encode_mask(mask[y0: y0 + height, x0: x0 + width])}


def mask_planes(mask: np.ndarray, grid: tuple[int, int], subgrid: int = 1, where: str = "mask") -> np.ndarray:
    """Map ``[H, W]`` -> ``[subgrid^2, h, w]`` float32: plane ``i * subgrid + j`` holds, for every latent pixel, the
    ROI fraction of sub-block ``(i, j)`` of its ``H/h x W/w`` block: a space-to-depth of the map, so the DiT sees
    where inside a latent pixel the cells lie (``subgrid=1``: the ROI fraction of each whole block, one plane).
    ``H`` and ``W`` must be whole multiples of ``h * subgrid`` and ``w * subgrid``."""
    m = np.asarray(mask, dtype=np.float32)
    (height, width), (h, w) = m.shape, grid
    if height % (h * subgrid) or width % (w * subgrid):
        raise DataError(f"{where}: shape {m.shape} is not a whole multiple of the latent grid {[h, w]} x "
                        f"mask_subgrid {subgrid}")
    bh, bw = height // (h * subgrid), width // (w * subgrid)
    blocks = m.reshape(h, subgrid, bh, w, subgrid, bw).mean(axis=(2, 5))  # [h, i, w, j]
    return np.ascontiguousarray(blocks.transpose(1, 3, 0, 2).reshape(subgrid * subgrid, h, w))


def condition_width(name: str, mask_subgrid: int = 1) -> int:
    """Channels condition ``name`` takes in a latent batch: ``mask_subgrid^2`` for the ROI map, 1 for the flux."""
    return mask_subgrid * mask_subgrid if name == MASK_KEY else 1


def flux_value(flux: float, where: str = "flux") -> float:
    """Mean photons per pixel per frame -> ``[0, 1]`` over :data:`LOG10_FLUX_RANGE` (ConfigError outside it)."""
    lo, hi = LOG10_FLUX_RANGE
    if not (isinstance(flux, (int, float)) and math.isfinite(flux) and 10**lo <= flux <= 10**hi):
        raise ConfigError(f"{where} = {flux!r}: expected mean photons per pixel per frame in [{10**lo:g}, {10**hi:g}]")
    return (math.log10(flux) - lo) / (hi - lo)


def clip_flux(photons: np.ndarray) -> float:
    """Mean photon flux of a clip in photon units, clamped into :data:`LOG10_FLUX_RANGE` (dark clips exist)."""
    lo, hi = LOG10_FLUX_RANGE
    return float(np.clip(float(np.mean(photons)), 10**lo, 10**hi))


def condition_channels(meta: dict[str, Any], names: list[str], latent_shape: tuple[int, ...],
                       where: str, mask_subgrid: int = 1) -> np.ndarray:
    """Channels ``[K, T, h, w]`` float32 of the conditions ``names`` of one sample, each
    :func:`condition_width` wide (the ROI map as :func:`mask_planes`); NaN: not given."""
    _, frames, h, w = latent_shape
    widths = [condition_width(name, mask_subgrid) for name in names]
    out = np.full((sum(widths), frames, h, w), np.nan, dtype=np.float32)
    start = 0
    for name, width in zip(names, widths):
        if name == MASK_KEY and MASK_KEY in meta:
            planes = mask_planes(decode_mask(meta[MASK_KEY], f"{where} {MASK_KEY}"), (h, w), mask_subgrid,
                                 f"{where} {MASK_KEY}")
            out[start:start + width] = planes[:, None]
        elif name == FLUX_KEY and FLUX_KEY in meta:
            out[start] = flux_value(float(meta[FLUX_KEY]), f"{where} {FLUX_KEY}")
        start += width
    return out


# ---------------------------------------------------------------------------------------------------------
# user masks at sample time


def _mask_array(path: Path, frame_shape: tuple[int, int]) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".json":
        from cadiff.data.sources.neurofinder import read_regions

        masks = read_regions(path, frame_shape)  # validates the format; drops pixels outside the frame
        _check_regions_inside(path, frame_shape)
        return masks
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"mask file {path}: not a readable .npy array ({type(exc).__name__}); expected a numeric "
                            "or boolean array written by numpy.save") from exc
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if TRUTH_ROIS_KEY not in npz.files:
                    raise DataError(f"mask file {path}: no '{TRUTH_ROIS_KEY}' array (has {sorted(npz.files)}); expected "
                                    "the ground truth of a jobs/export.py movie (tiff/<id>.npz)")
                return np.asarray(npz[TRUTH_ROIS_KEY])
        except (OSError, ValueError) as exc:
            raise DataError(f"mask file {path}: not a readable .npz archive ({type(exc).__name__})") from exc
    import tifffile

    try:
        return tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise DataError(f"mask file {path}: not a readable TIFF ({exc})") from exc


def _check_regions_inside(path: Path, frame_shape: tuple[int, int]) -> None:
    """A regions.json pixel outside the sample's frame means the ROIs were drawn for another field of view."""
    regions = json.loads(path.read_text())
    coords = np.concatenate([np.asarray(r["coordinates"], dtype=np.int64).reshape(-1, 2) for r in regions] or
                            [np.zeros((0, 2), np.int64)])
    outside = (coords < 0).any(axis=1) | (coords[:, 0] >= frame_shape[0]) | (coords[:, 1] >= frame_shape[1])
    if outside.any():
        raise DataError(f"mask file {path}: {int(outside.sum())} ROI pixels lie outside the sample's frame "
                        f"{tuple(frame_shape)} (first [row, col] = {coords[outside][0].tolist()}); expected regions "
                        "drawn on a field of view of the sample's size")


def load_mask(path: str | Path, frame_shape: tuple[int, int]) -> np.ndarray:
    """User ROI mask -> bool ``[H, W]``: a ``.npy``/``.tif`` map ``[H, W]`` or stack ``[N, H, W]`` (non-zero is
    inside), the ``rois`` of a ``jobs/export.py`` ground-truth ``.npz``, or a Neurofinder ``regions.json``; its
    frame must equal the sample's ``frame_shape`` exactly."""
    path = Path(path)
    if path.suffix.lower() not in MASK_SUFFIXES:
        raise DataError(f"mask file {path}: suffix {path.suffix!r}, expected one of {list(MASK_SUFFIXES)} "
                        "(an [H, W] or [N, H, W] map, an export's ground-truth .npz, or a Neurofinder regions.json)")
    if not path.is_file():
        raise DataError(f"mask file {path}: not found; expected an existing {path.suffix} file")
    array = np.asarray(_mask_array(path, frame_shape))
    if array.ndim not in (2, 3) or tuple(array.shape[-2:]) != tuple(frame_shape):
        raise DataError(f"mask file {path}: shape {tuple(array.shape)}, expected [H, W] or [N, H, W] with "
                        f"H, W = {tuple(frame_shape)} (the sample's frame size; crop or pad the mask to it)")
    if array.dtype.kind not in "biuf" or (array.dtype.kind == "f" and not np.isfinite(array).all()):
        raise DataError(f"mask file {path}: dtype {array.dtype}, expected finite numbers or booleans (non-zero = ROI)")
    return (array != 0) if array.ndim == 2 else (array != 0).any(axis=0)

