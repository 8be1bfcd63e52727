"""Sampling: DiT latents -> stage-1 decoder -> movies in the source's units (TIFF and/or NWB, GIF + MP4).

Movies are uint16, or float32 for a float source prepared in raw units (``source.calibration=none``).
``out_format`` picks the movie files: ImageJ TIFF, NWB (a TwoPhotonSeries whose description holds the provenance:
cadiff version, stage-1/stage-2 exports, seed, samplers; calibration as NWB conversion/offset, none in raw units)
or both.

Batches are fixed slices ``[i, i + batch_size)`` of the sample indices, each drawn with a generator seeded by
``(seed, i)``: the same seed and batch size give bit-identical files whether the batches run here or fan out
over Ray tasks (NWB files: identical frames; each file has its own identifier and creation time, as NWB requires).

Conditioned stage-2 models take ``mask=<.npy|.tif|regions.json>`` (an ROI map at the sample's frame size) and/or
``flux=<photons per pixel per frame>``, mixed with the unconditional model by ``guidance_scale``; both are
checked against the model and loaded before any sampling, and recorded in ``samples.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cadiff import __version__
from cadiff.config import DataConfig, from_dict
from cadiff.data import pipeline
from cadiff.data.conditioning import FLUX_KEY, MASK_KEY, flux_value, load_mask, mask_planes
from cadiff.data.movie import denormalize, source_dtype, to_source_units
from cadiff.data.shards import read_index
from cadiff.data.sources.tiff import write_tiff, write_tiff_frames
from cadiff.errors import CheckpointError, ConfigError, DataError
from cadiff.inference.long_movie import chunk_spans, guidance, plan_long_movie, stream_sample
from cadiff.io import atomic_dir, check_output_dir, write_json_atomic
from cadiff.models.autoencoder import REACH_LIMIT
from cadiff.runtime.exports import load_exported_model
from cadiff.runtime.preflight import SharedPath, probe_cluster_paths
from cadiff.runtime.ray import init_ray
from cadiff.runtime.video import video_grid, write_video

log = logging.getLogger(__name__)


PREVIEW_FRAMES = 256  # frames of a long movie shown in its GIF/MP4 previews (the TIFF has them all)
MOVIE_SUFFIXES = {"tiff": (".tif",), "nwb": (".nwb",), "both": (".tif", ".nwb")}  # out_format -> movie files


def write_nwb_movie(movie: np.ndarray, path: Path, rate_hz: float, provenance: dict[str, Any]) -> Path:
    """``path`` as NWB: the movie in source units, its calibration, and ``provenance`` (JSON) as the description.

    A raw-unit movie (calibration ``none``: no gain or offset) is a series in the source's own units (unit 'n.a.')."""
    from cadiff.data.sources.nwb import NWBMovie, write_nwb

    calib = provenance.get("calibration") or {}
    record = json.dumps({"cadiff_version": __version__, **provenance}, sort_keys=True, default=str)
    nwb_movie = NWBMovie(frames=movie, rate_hz=rate_hz, description=f"{provenance.get('movie', path.stem)}; "
                         f"provenance (JSON): {record}", origin="none: frames written by cadiff jobs/sample.py",
                         gain=calib.get("gain"), offset=calib.get("offset"))
    return write_nwb(path, nwb_movie, f"cadiff {__version__} jobs/sample.py mode={provenance.get('mode')}")


def write_movie(movie: np.ndarray, stem: Path, calib: dict[str, Any], fps: int, out_format: str = "tiff",
                provenance: dict[str, Any] | None = None) -> list[Path]:
    """``stem.tif`` and/or ``stem.nwb`` (``out_format``) in source units (frame rate and pixel size from the
    source's ``calib``) plus ``stem.gif`` / ``stem.mp4`` previews (percentile-scaled); ``provenance`` (what the
    movie is, how it was made) goes into the NWB file."""
    preview = video_grid([[movie.astype(np.float32)]], pad=0)
    rate_hz = source_rate_hz(calib)
    paths = []
    if ".tif" in MOVIE_SUFFIXES[out_format]:
        paths.append(write_tiff(movie, stem.with_suffix(".tif"), rate_hz, calib.get("pixel_size_um")))
    if ".nwb" in MOVIE_SUFFIXES[out_format]:
        paths.append(write_nwb_movie(movie, stem.with_suffix(".nwb"), rate_hz, provenance or {}))
    return paths + [write_video(preview, stem.with_suffix(".gif"), fps), write_video(preview, stem.with_suffix(".mp4"), fps)]


def _files_note(out_format: str) -> str:
    return " ".join([*MOVIE_SUFFIXES[out_format], ".gif", ".mp4"])


def source_rate_hz(calib: dict[str, Any]) -> float:
    """The source's frame rate (10 Hz for exports that recorded none)."""
    return float(calib.get("rate_hz") or 10.0)


def grid_rows(movies: list[np.ndarray], per_row: int = 4) -> list[list[np.ndarray]]:
    """Rows of ``per_row`` float panels; the last row is padded with blank panels."""
    panels = [m.astype(np.float32) for m in movies]
    blank = np.zeros_like(panels[0])
    rows = [panels[r : r + per_row] for r in range(0, len(panels), per_row)]
    if len(rows) > 1:
        rows[-1] += [blank] * (per_row - len(rows[-1]))
    return rows


def batch_slices(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]


def _calibration(data_info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    sources = data_info.get("sources") or {}
    if not sources:
        raise CheckpointError("stage-1 export records no data sources: cannot convert samples to source units")
    source_id = sorted(sources)[0]
    return source_id, sources[source_id]


@torch.no_grad()
def generate_batch(stage2: str, stage1: str | None, start: int, stop: int, cfg: dict[str, Any]) -> list[np.ndarray]:
    """Samples ``start..stop-1`` as movies [T,H,W] in source units (a pure function of its arguments, for Ray tasks too)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dit, dit_meta, _, decoder, ae_meta, _ = load_pair(stage2, stage1)
    generator = torch.Generator().manual_seed(int(cfg["seed"]) * 1_000_003 + start)
    clips = sample_decoded(dit, decoder, dit_meta["data"], stop - start, generator,
                           {"sampler": cfg["latent_sampler"], "num_steps": cfg["latent_steps"],
                            **guidance(cfg, stop - start)},
                           {"sampler": cfg["decoder_sampler"], "num_steps": cfg["decoder_steps"],
                            "grid": cfg["decoder_grid"]})
    _source, calib = _calibration(ae_meta["data"])
    return [to_source_units(denormalize(c[0], calib, ae_meta["data"]["normalization"]), calib) for c in clips]


def calibration_record(source_id: str, calib: dict[str, Any]) -> dict[str, Any]:
    """``samples.json``'s calibration: the photon calibration of the source, or ``calibration: none`` for movies
    in the source's own units (no photon scale; evaluation reports gain-based metrics as not applicable), with the
    frame rate and pixel size the movie files carry."""
    record = {"source": source_id, "gain": calib["gain"], "offset": calib["offset"],
              "read_noise": calib.get("read_noise"), "rate_hz": source_rate_hz(calib),
              "pixel_size_um": calib.get("pixel_size_um")}
    if calib.get("calibration") == "none":
        record["calibration"] = "none"
    return record


def sample_params(cfg: Any, decoder: Any) -> dict[str, Any]:
    """What a generate run records in ``samples.json``: seed, samplers, steps and the requested conditions."""
    params = {k: cfg[k] for k in ("seed", "latent_sampler", "latent_steps", "mask", "flux", "guidance_scale")}
    return {**params, **decoder_settings(decoder, cfg)}


def decoder_settings(decoder: Any, cfg: Any) -> dict[str, Any]:
    """The stage-1 sampler, steps and time grid: ``decoder_sampler``/``decoder_steps``/``decoder_grid`` when set,
    else what the run recorded."""
    objective = getattr(decoder, "objective", None)
    if objective is None:  # the regression decoder is one deterministic evaluation
        return {"decoder_sampler": None, "decoder_steps": None, "decoder_grid": None}
    sampler, steps = objective.resolve(cfg["decoder_sampler"], cfg["decoder_steps"])
    grid = objective.resolve_grid(cfg.get("decoder_grid"))
    return {"decoder_sampler": sampler, "decoder_steps": steps, "decoder_grid": grid}


def check_pair(dit: Any, decoder: Any, stage1_path: str) -> None:
    """The DiT must have been trained on latents of this encoder (channel count)."""
    dit_channels = int(dit.model_config.get("in_channels") or 0)
    z_channels = int(decoder.model_config.get("z_channels") or 0)
    if dit_channels != z_channels:
        raise CheckpointError(
            f"stage1='{stage1_path}' has z_channels={z_channels} but the stage-2 DiT expects {dit_channels} latent channels"
        )


def mask_guidance(has_mask: bool, dit: Any, guidance_scale: float, flux: float | None, flux_median: float | None,
                  source: str = "the stage-2 model") -> tuple[float | None, list[str] | None]:
    """``(flux, guided)`` of a sample: a guided mask (``guidance_scale`` != 1) for a DiT that also takes a flux is
    held at ``flux``, else at ``flux_median``, with the guidance on the mask alone (``guided = ["roi_mask"]``);
    otherwise ``flux`` as given and the guidance on every given condition (``None``). The sample job and the
    generation benchmark both decide by it (:func:`requested_conditions`).

    With neither ``flux`` nor ``flux_median`` (latents encoded before encode_latents recorded the median) a guided
    mask has no brightness to hold: it is guided as before, brightness free, with a warning naming ``source``."""
    if has_mask and dit.dit.flux_embedder is not None and guidance_scale != 1.0:
        held = float(flux) if flux is not None else (float(flux_median) if flux_median is not None else None)
        if held is not None:
            return held, [MASK_KEY]
        log.warning("%s records no training flux (latents encoded before encode_latents recorded flux_median): the "
                    "mask is guided with the brightness free; pass flux= to hold it", source)
    return (float(flux) if flux is not None else None), None


def requested_conditions(cfg: Any, dit: Any, latent_hw: tuple[int, int], spatial_downsample: int,
                         flux_median: float | None = None) -> dict[str, Any]:
    """``mask``/``flux`` of a generate run as plain values (the ROI map's planes on the latent grid as nested lists,
    flux scaled to ``[0, 1]``), checked against what the stage-2 model was trained with before any sampling.

    A mask is guided (``guidance_scale`` != 1) at a held brightness when the model also takes a flux: the guidance
    then applies to the mask alone and the flux - the requested one, else ``flux_median`` (the training latents', recorded by
    encode_latents) - is given to both guidance branches. Guiding both, the mask's pull also extrapolates the
    brightness that the cell count correlates with: empty masks came out a third darker than cell-free tiles,
    with a bright edge the ROI detector took for cells (README "Conditioning on ROIs and brightness").
    Returns ``{"conditions": ..., "guided": names or None (all), "flux_held": photons or None}``."""
    conditions: dict[str, Any] = {}
    h, w = latent_hw
    for key, takes, model_key in (("mask", dit.dit.mask_flag is not None, "cond_mask"),
                                  ("flux", dit.dit.flux_embedder is not None, "cond_flux")):
        if cfg[key] is not None and not takes:
            raise ConfigError(f"config key '{key}' = {cfg[key]!r}: stage2 '{cfg.stage2}' was trained without this "
                              f"condition (model.{model_key}=false); expected {key}=null, or a model trained with "
                              f"model.{model_key}=true")
    if cfg.mask is not None:
        mask = load_mask(cfg.mask, (h * spatial_downsample, w * spatial_downsample))
        # the planes the model was trained on (latents.mask_subgrid): one map [h, w], or [subgrid^2, h, w]
        planes = mask_planes(mask, (h, w), dit.mask_subgrid, f"mask file {cfg.mask}")
        conditions[MASK_KEY] = (planes[0] if dit.mask_subgrid == 1 else planes).tolist()
        log.info("ROI mask %s: %d of %d pixels inside ROIs", cfg.mask, int(mask.sum()), mask.size)
    held, guided = mask_guidance(cfg.mask is not None, dit, cfg.guidance_scale, cfg.flux, flux_median,
                                 source=f"stage2 '{cfg.stage2}'")
    if guided and cfg.flux is None:
        log.info("ROI mask guided at the training latents' median flux %.4g photons/px/frame (set flux= for "
                 "another brightness)", held)
    if held is not None:
        conditions[FLUX_KEY] = flux_value(held, "config key 'flux'" if cfg.flux is not None else "flux_median")
    return {"conditions": conditions, "guided": guided, "flux_held": held if guided else None}


def load_pair(stage2: str | Path, stage1: str | Path | None = None
              ) -> tuple[Any, dict[str, Any], Path, Any, dict[str, Any], Path]:
    """The DiT of a stage-2 export and the stage-1 model that decodes it (``stage1``, else the one the stage-2 run
    recorded), checked as a pair: each with its metadata and export folder."""
    dit, dit_meta, stage2_export = load_exported_model(stage2, "stage2", "latent")
    stage1 = stage1 or dit_meta["data"]["stage1"]
    decoder, ae_meta, stage1_export = load_exported_model(stage1, "stage1", "ae")
    check_pair(dit, decoder, str(stage1))
    return dit, dit_meta, stage2_export, decoder, ae_meta, stage1_export


@torch.no_grad()
def sample_decoded(dit: Any, decoder: Any, data_info: dict[str, Any], num: int, generator: torch.Generator,
                   latent: dict[str, Any] | None = None, decode: dict[str, Any] | None = None) -> torch.Tensor:
    """``num`` latents of the DiT (``latent``: its sample() options; none: its defaults) in the stage-2 run's
    ``data_info`` shape, de-normalized with its latent statistics and decoded (``decode``: the decoder's options):
    clips ``[N, 1, T, H, W]`` in the stage-1 model's input units."""
    z = dit.sample((num, *data_info["sample_shape"]), generator=generator, **(latent or {}))
    return decoder.decode(pipeline.denormalize_latents(z, pipeline.latent_stats(data_info)), generator=generator,
                          **(decode or {}))


def generate(cfg: Any) -> tuple[str, str]:
    """jobs/sample.py mode=generate (``num_frames`` set: :func:`generate_long`)."""
    if cfg.num_frames is not None:
        return generate_long(cfg)
    out = Path(cfg.out)
    # loaded up front: a bad stage1/stage2 fails before any work
    dit, dit_meta, stage2_export, decoder, ae_meta, stage1_export = load_pair(cfg.stage2, cfg.stage1)
    source_id, calib = _calibration(ae_meta["data"])
    requested = requested_conditions(cfg, dit, tuple(dit_meta["data"]["sample_shape"][2:]),
                                     decoder.spatial_downsample, dit_meta["data"].get("flux_median"))
    params = {**sample_params(cfg, decoder), "guided": requested["guided"], "flux_held": requested["flux_held"]}
    args = {**params, "conditions": requested["conditions"]}
    slices = batch_slices(cfg.num_samples, cfg.batch_size)
    movies: list[np.ndarray] = []
    if cfg.num_ray_tasks > 0:
        import ray

        init_ray(cfg.ray)
        # the tasks load both exports on whichever node they land on
        probe_cluster_paths(cfg.ray, [SharedPath("stage2", str(stage2_export)), SharedPath("stage1", str(stage1_export))])
        task = ray.remote(num_cpus=1)(generate_batch)
        refs = [task.remote(str(stage2_export), str(stage1_export), a, b, args) for a, b in slices]
        for ref in tqdm(refs, desc="sampling (ray tasks)", unit="batch"):
            movies += ray.get(ref)
    else:
        for a, b in tqdm(slices, desc="sampling", unit="batch"):
            movies += generate_batch(str(stage2_export), str(stage1_export), a, b, args)
    record = {
        "mode": "generate",
        "num_samples": len(movies),
        "shape": list(movies[0].shape),
        "dtype": str(source_dtype(calib)),
        "calibration": calibration_record(source_id, calib),
        "stage1": str(stage1_export),
        "stage2": str(stage2_export),
        "out_format": cfg.out_format,
        **params,
    }
    with atomic_dir(out, "sample", cfg.overwrite) as tmp:
        for i, movie in enumerate(movies):
            write_movie(movie, tmp / f"sample_{i:03d}", calib, cfg.fps, cfg.out_format,
                        {**record, "movie": f"generated sample {i}"})
        grid = video_grid(grid_rows(movies))
        write_video(grid, tmp / "grid.gif", cfg.fps)
        write_video(grid, tmp / "grid.mp4", cfg.fps)
        write_json_atomic(tmp / "samples.json", record)
    t, h, w = movies[0].shape
    return f"{len(movies)} samples {t}x{h}x{w} {movies[0].dtype} ({_files_note(cfg.out_format)})", str(out)


def _long_frames(stream: Iterator[torch.Tensor], calib: dict[str, Any], norm: dict[str, Any],
                 preview: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Frames [H, W] in source units of a streamed sample; the first :data:`PREVIEW_FRAMES` are also kept in ``preview``."""
    for clip in stream:
        for frame in to_source_units(denormalize(clip[0, 0], calib, norm), calib):
            if len(preview) < PREVIEW_FRAMES:
                preview.append(frame)
            yield frame


def generate_long(cfg: Any) -> tuple[str, str]:
    """jobs/sample.py num_frames=N: chunked DiT rollout streamed through the causal decoder into the TIFF.

    Samples are drawn one at a time (``batch_size`` does not apply); GIF/MP4 previews show the first
    :data:`PREVIEW_FRAMES` frames.
    """
    # loaded up front: a bad stage1/stage2 fails before any work
    dit, dit_meta, stage2_export, decoder, ae_meta, stage1_export = load_pair(cfg.stage2, cfg.stage1)
    data2 = dit_meta["data"]
    _, chunk, h, w = data2["sample_shape"]
    s = decoder.spatial_downsample
    reach = decoder.latent_reach()
    plan = plan_long_movie(cfg.num_frames, cfg.context_frames, cfg.decode_context_frames, chunk,
                           decoder.temporal_downsample, reach)
    if reach is None and cfg.decode_context_frames is None:
        log.warning("the stage-1 decoder's window-start effect lasts %d latent frames or more; its windows take "
                    "the DiT's %d context frames, so seams may show (set decode_context_frames= higher)",
                    REACH_LIMIT, plan.decode_context)
    else:
        log.info("decoder windows: %d latent frames of left context (the decoder's reach: %s)", plan.decode_context,
                 reach)
    source_id, calib = _calibration(ae_meta["data"])
    norm = ae_meta["data"]["normalization"]
    dtype = source_dtype(calib)
    requested = requested_conditions(cfg, dit, (h, w), s, data2.get("flux_median"))
    params = {**sample_params(cfg, decoder), "context_guidance": float(cfg.context_guidance),
              "guided": requested["guided"], "flux_held": requested["flux_held"]}
    args = {**params, "conditions": requested["conditions"]}
    shape = (plan.num_frames, h * s, w * s)
    record = {"mode": "generate", "num_samples": int(cfg.num_samples), "shape": list(shape), "dtype": str(dtype),
              "calibration": calibration_record(source_id, calib), "stage1": str(stage1_export),
              "stage2": str(stage2_export), "out_format": cfg.out_format, **params,
              "long_movie": {**asdict(plan), "chunks": len(chunk_spans(plan.num_latent, plan.chunk, plan.context)),
                             "preview_frames": min(PREVIEW_FRAMES, plan.num_frames)}}
    previews = []
    with atomic_dir(cfg.out, "sample", cfg.overwrite) as tmp:
        for i in tqdm(range(cfg.num_samples), desc="sampling (long)", unit="movie"):
            preview: list[np.ndarray] = []
            stem = tmp / f"sample_{i:03d}"
            write_tiff_frames(_long_frames(stream_sample(dit, decoder, data2, plan, args, i), calib, norm, preview),
                              stem.with_suffix(".tif"), shape, source_rate_hz(calib), dtype, calib.get("pixel_size_um"))
            movie = np.stack(preview)
            clip = video_grid([[movie.astype(np.float32)]], pad=0)
            write_video(clip, stem.with_suffix(".gif"), cfg.fps)
            write_video(clip, stem.with_suffix(".mp4"), cfg.fps)
            previews.append(movie)
        grid = video_grid(grid_rows(previews))
        write_video(grid, tmp / "grid.gif", cfg.fps)
        write_video(grid, tmp / "grid.mp4", cfg.fps)
        write_json_atomic(tmp / "samples.json", record)
    return (f"{cfg.num_samples} samples {shape[0]}x{shape[1]}x{shape[2]} {dtype} in {record['long_movie']['chunks']} "
            f"chunks (.tif .gif .mp4, previews: first {PREVIEW_FRAMES} frames)", str(cfg.out))


@torch.no_grad()
def reconstruct(cfg: Any) -> tuple[str, str]:
    """jobs/sample.py mode=reconstruct: encode real val clips and decode them with a fresh noise realization."""
    model, meta, export = load_exported_model(cfg.stage1, "stage1", "ae")
    root = Path(cfg.data.root)
    index = read_index(root)
    if index.get("kind", "clips") != "clips":
        raise DataError(f"data.root '{root}': expected a clip shard folder, found kind '{index.get('kind')}'")
    _, t, h, w = meta["data"]["sample_shape"]
    data_cfg = dict(cfg.data)
    data_cfg.update(crop_frames=t, crop_height=h, crop_width=w)
    clips = pipeline.val_batch(str(root), cfg.num_samples, from_dict(data_cfg, DataConfig), kind="clips")
    source_id, calib = _calibration({"sources": index["sources"]})
    norm = index["normalization"]
    generator = torch.Generator().manual_seed(int(cfg.seed))
    settings = decoder_settings(model, cfg)
    recons, denoised = [], []
    for a, b in tqdm(batch_slices(len(clips), cfg.batch_size), desc="reconstructing", unit="batch"):
        x = clips[a:b]
        z = model.encode(x)
        recons.append(model.decode(z, sampler=settings["decoder_sampler"], num_steps=settings["decoder_steps"],
                                   grid=settings["decoder_grid"],
                                   generator=generator))
        if model.has_signal_estimate:
            denoised.append(model.denoise(z))
    recon = torch.cat(recons)
    estimate = torch.cat(denoised) if denoised else None
    record = {
        "mode": "reconstruct", "num_samples": len(clips), "shape": [t, h, w],
        "dtype": str(source_dtype(calib)),
        "calibration": calibration_record(source_id, calib),
        "stage1": str(export), "data_root": str(root.resolve()), "seed": int(cfg.seed), "out_format": cfg.out_format,
        **settings,
        # denoised_*.tif: the decoder's signal estimate E[x | z] (no shot noise), same units as recon_*.tif
        "denoised": estimate is not None,
    }
    with atomic_dir(cfg.out, "sample", cfg.overwrite) as tmp:
        def source_movie(x: torch.Tensor, estimate: bool = False) -> np.ndarray:
            return to_source_units(denormalize(x, calib, norm, estimate=estimate), calib)

        for i in range(len(clips)):
            write_movie(source_movie(recon[i, 0]), tmp / f"recon_{i:03d}", calib, cfg.fps, cfg.out_format,
                        {**record, "movie": f"reconstruction of reference clip {i}"})
            if estimate is not None:
                write_movie(source_movie(estimate[i, 0], estimate=True), tmp / f"denoised_{i:03d}", calib, cfg.fps,
                            cfg.out_format, {**record, "movie": f"signal estimate E[x | z] of reference clip {i}"})
            write_movie(source_movie(clips[i, 0]), tmp / "reference" / f"clip_{i:03d}", calib, cfg.fps,
                        cfg.out_format, {**record, "movie": f"reference clip {i} of the prepared data (data.root)"})
        write_json_atomic(tmp / "samples.json", record)
    mse = float(((recon - clips) ** 2).mean())
    extra = f" denoised_mse={float(((estimate - clips) ** 2).mean()):.4g}" if estimate is not None else ""
    return f"{len(clips)} reconstructions {t}x{h}x{w} mse={mse:.4g}{extra}", str(cfg.out)


def run_sample(cfg: Any) -> tuple[str, str]:
    check_output_dir(cfg.out, "sample", cfg.overwrite)  # before any work: refuse a folder it may not replace
    return generate(cfg) if cfg.mode == "generate" else reconstruct(cfg)

