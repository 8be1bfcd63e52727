"""The conditioned half of the generation benchmark (issue 13 item 3): a second DiT trained on the same latents
with each training tile's conditions - its ROI map (the union of the simulator's ground-truth ROIs, as
:data:`MASK_SUBGRID`^2 sub-block planes on the latent grid) and its mean photon flux, the channels
``encode_latents`` appends - then sampled with classifier-free guidance for:

- **held-out ROI masks**: each held-out movie's first-frame tiles ask for their own ground-truth cells. An ROI
  detector (:func:`cadiff.eval.rois.detect_rois`: the correlation image or the mean image, whichever finds the
  real tiles' own cells better, :func:`choose_detector`) runs on every sample and is matched to the requested ROIs
  at IoU >= 0.5, pooled over samples (``roi_f1``); the same detector on the real tiles is the ceiling. The
  local-correlation contrast inside/outside the requested ROIs (:func:`cadiff.eval.rois.roi_contrast`) is reported
  too, with unconditional samples as the control (same masks, no reason for their activity to sit there). The
  same judgment (:func:`judge_masks`) runs on movies as long as the held-out ones (:func:`sample_movies`: chunked
  rollouts with the mask on every chunk, against the held-out movies' first frames), which give the summary's
  ``roi_f1`` and ``null_rois``:
  17 frames of photon-starved data hold too few photons for a detector to find even the real tiles' cells. When no
  detector finds the real movies' cells (ceiling F1 < :data:`MIN_CEILING_F1`), ``roi_f1`` and ``null_rois`` are
  reported as not measured;
- **an empty mask** (the null test): ROIs the detector finds in those samples (``null_rois``, summed), beside what
  it finds in as many real tiles of the preset simulated without cells (``null_rois_real``: the detector's own
  false positives);
- **four requested fluxes** across a 4x range around the training tiles' median: the largest relative error of the
  samples' measured mean photon flux (``gain_cond_max_err``: brightness is conditioned on flux, not on the
  detector gain, which the DiT never sees; see README "Conditioning on ROIs and brightness").

A model can only follow a flux it has seen: the preset's own movies span a narrow flux band (two_photon: ~0.15-0.19
photons per pixel per frame), so the conditioned DiT trains on movies of the same preset with their neuron and
neuropil photon rates scaled by a per-movie factor drawn log-uniformly over :data:`BRIGHTNESS` (other seeds, encoded
by the same stage-1 model and normalized with the unconditional latents' statistics). Stage 1 must carry that
brightness through its latent too: the generation benchmark trains it on these movies beside the preset's own
(``GenConfig.ae_brightness``); trained on the preset's band alone, it decodes every flux to that band.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cadiff.bench.ae_quality import BenchData, cut_clips, encode, flips, tile_origins
from cadiff.bench.stage2 import decode_photons, train_dit
from cadiff.data.conditioning import (
    CONDITIONS,
    FLUX_KEY,
    MASK_KEY,
    clip_flux,
    condition_channels,
    encode_mask,
    flux_value,
    mask_planes,
)
from cadiff.data.movie import to_photons
from cadiff.data.pipeline import normalize_latents
from cadiff.data.simulate import PRESETS, simulate_movie
from cadiff.errors import DataError
from cadiff.eval.rois import DETECTORS, detect_rois, match_rois, pool_matches, roi_contrast
from cadiff.inference.long_movie import plan_long_movie, stream_movie
from cadiff.inference.sample import mask_guidance

log = logging.getLogger(__name__)

MASK_SUBGRID = 4  # the ROI map as 4x4 sub-block fractions per latent pixel (2x2 px of ae_tiny's 8x8 px blocks)
COND_OVERRIDES = ("model.cond_mask=true", "model.cond_flux=true", f"model.mask_subgrid={MASK_SUBGRID}")
# the demo's mask sample uses the same. Measured on one stage 1 and one conditioned DiT (8000 steps), 253-frame
# movies, the flux guided with the mask (before mask_guide): guidance 2 -> ROI F1 0.774, null 0, mean flux 0.142
# photons/px/frame; 3 -> 0.787, null 3, 0.160; 4.5 -> 0.791, null 9, 0.188. The empty-mask movies' false cells sat
# at one place, a bright top edge (row 0 at 1.20x the median of the mean image, 1.02 unguided), and the movies were
# a third darker than cell-free tiles (0.076 against 0.107): guiding the mask with the flux free extrapolates the
# brightness the cell count correlates with. Held at the median flux (mask_guide), the 2250-step stage 1's empty
# masks gave 0 false ROIs in 32 movies at guidance 2 and 3 (3 in 32 guided free), row 0 at 1.02-1.04, flux 0.122;
# ROI F1 0.803 -> 0.810 (1500 steps: 0.774 -> 0.764). Also tried, flux free: Heun 10 steps (19 NFE) F1 0.776;
# guidance 4 at t >= 0.5 only, 1 below (a guidance interval) 0.784; CFG rescale 0.7 still 1 null ROI in 32
GUIDANCE = 2.0
BRIGHTNESS = (0.3, 3.0)  # per-movie photon-rate factor of the conditioned DiT's training movies (log-uniform)
BRIGHTNESS_KEYS = ("neuron_photons", "background_photons")  # simulator preset keys the factor scales
FLUX_FACTORS = (0.5, 0.8, 1.25, 2.0)  # x the training tiles' median flux: a 4x range
SAMPLES_PER_CONDITION = 4
# Samples per requested flux. A clip's flux scatters around the request (its cells, their activity): the mean of
# 16 clips carried a relative standard error of 1-2% (a 0.112 error on 16 clips read 0.096 on 64, same model),
# 64 clips 0.4-1% (17-frame clips: ~2 s per level on 2 CPUs). Each level's standard error is reported.
FLUX_SAMPLES = 64
SAMPLER, STEPS = "euler", 20  # the headline sampler (generation.HEADLINE)
MIN_ROI_PIXELS = 12  # a ground-truth ROI cut by a tile edge to fewer pixels is not asked for (detect_rois min_size)
# Below this F1 of the detector on the real tiles, ROI recovery and the null test measure the detector, not the
# model (0 ROIs in an empty-mask sample proves nothing when real cells are not found either): both are reported
# as not measured, with the ceiling in the reason
MIN_CEILING_F1 = 0.5


def brightness_movies(preset: str, count: int, frames: int, side: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` photon movies of ``preset`` with their ROI unions, photon rates scaled per movie (:data:`BRIGHTNESS`)."""
    rng = np.random.default_rng(seed)
    movies, rois = [], []
    for i in range(count):
        factor = float(np.exp(rng.uniform(*np.log(BRIGHTNESS))))
        overrides = {k: PRESETS[preset][k] * factor for k in BRIGHTNESS_KEYS}
        movie, truth = simulate_movie(preset, frames, side, side, seed=seed + i, return_clean=False, **overrides)
        movies.append(to_photons(movie.data, movie.gain, movie.offset))
        # the union, as prepare_data stores it. Tried: the union less a one-pixel gap at every contact between two
        # cells (63% of the ROIs touch another), on one stage 1: ROI F1 0.774 -> 0.750, touching cells found 50% ->
        # 47% of the time, cells under 40 px 36% -> 28%: the gaps shrank the generated cells more than they split them
        rois.append(truth.rois.any(axis=0))
    return movies, rois


def training_conditions(movies: Sequence[np.ndarray], rois: Sequence[np.ndarray], frames: int, side: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Photon clips ``[N, frames, side, side]``, ROI maps ``[N, side, side]`` and fluxes ``[N]`` of every tile of every
    movie, then the same stacks flipped vertically, horizontally and both (``training_latents``' order)."""
    if len(rois) != len(movies):
        raise DataError(f"conditioned benchmark: {len(rois)} ROI maps for {len(movies)} training movies; expected "
                        "simulated movies (their ground truth is the condition)")
    clips, masks = [], []
    for movie, roi in zip(movies, rois):
        origins = tile_origins(movie.shape, frames, side)
        clips.append(cut_clips(movie, origins, frames, side))
        masks += [roi[y0:y0 + side, x0:x0 + side] for _, y0, x0 in origins]
    c = flips(np.concatenate(clips))
    m = flips(np.stack(masks)[:, None])[:, 0]
    return c, m, np.array([clip_flux(x) for x in c])


def with_conditions(latents: torch.Tensor, masks: np.ndarray, fluxes: np.ndarray,
                    mask_subgrid: int = MASK_SUBGRID) -> torch.Tensor:
    """``latents [N, C, t, h, w]`` with the condition channels appended, as the latent pipeline does."""
    shape = tuple(latents.shape[1:])
    channels = np.stack([condition_channels({MASK_KEY: encode_mask(m), FLUX_KEY: float(f)}, list(CONDITIONS), shape,
                                            "benchmark tile", mask_subgrid) for m, f in zip(masks, fluxes)])
    return torch.cat([latents, torch.from_numpy(channels)], dim=1)


def mask_condition(mask: np.ndarray, latent_hw: tuple[int, int], n: int, subgrid: int) -> torch.Tensor:
    """ROI map ``mask [H, W]`` as the DiT's ``roi_mask`` condition: its :func:`mask_planes` on the latent grid,
    repeated ``[n, subgrid^2, h, w]``."""
    return torch.from_numpy(mask_planes(mask, latent_hw, subgrid)).expand(n, -1, -1, -1).clone()


def mask_guide(dit: Any, mask: np.ndarray, latent_hw: tuple[int, int], n: int, held_flux: float | None
               ) -> dict[str, Any]:
    """``LatentDiffusion.sample`` keywords for ROI map ``mask`` as the sample job gives them
    (:func:`cadiff.inference.sample.mask_guidance`): the mask guided by :data:`GUIDANCE`, at ``held_flux`` (the
    training tiles' median) given to both guidance branches when the DiT takes a flux."""
    guide = {"conditions": {MASK_KEY: mask_condition(mask, latent_hw, n, dit.mask_subgrid)}, "guidance_scale": GUIDANCE}
    held, guided = mask_guidance(True, dit, GUIDANCE, None, held_flux)
    if guided:
        guide["conditions"][FLUX_KEY] = torch.full((n,), flux_value(held))
        guide["guided"] = guided
    return guide


@torch.no_grad()
def sample(dit: Any, models: dict[str, Any], data: BenchData, n: int, seed: int, mask: np.ndarray | None = None,
           flux: float | None = None) -> np.ndarray:
    """``n`` photon clips with guidance :data:`GUIDANCE`: for ROI map ``mask`` held at ``flux`` (:func:`mask_guide`),
    for ``flux`` alone (guided itself), or, with neither, unconditional."""
    latent = models["latent"]
    if mask is not None:
        guide = mask_guide(dit, mask, tuple(latent[2:]), n, flux)
    elif flux is not None:
        guide = {"conditions": {FLUX_KEY: torch.full((n,), flux_value(flux))}, "guidance_scale": GUIDANCE}
    else:
        guide = {}
    generator = torch.Generator().manual_seed(seed)
    z = dit.sample((n, *latent), sampler=SAMPLER, num_steps=STEPS, generator=generator, **guide)
    return decode_photons(models["ae"], z, models["stats"], data, generator)


@torch.no_grad()
def sample_movies(dit: Any, models: dict[str, Any], data: BenchData, n: int, frames: int, seed: int,
                  mask: np.ndarray, held_flux: float | None = None) -> np.ndarray:
    """``n`` photon movies ``[n, frames, H, W]`` for ROI map ``mask``: the sample job's chunked rollout
    (:mod:`cadiff.inference.long_movie`, default context) with the mask guided at ``held_flux`` (:func:`mask_guide`)
    on every chunk, streamed through the stage-1 decoder."""
    ae, (c, t, h, w) = models["ae"], models["latent"]
    reach = models["reach"] if "reach" in models else ae.latent_reach()  # the trained pair's, measured once
    plan = plan_long_movie(frames, None, None, t, ae.temporal_downsample, reach)
    guide = mask_guide(dit, mask, (h, w), n, held_flux)
    chunks = stream_movie(dit, lambda z, gen: ae.decode(z, generator=gen), models["stats"], plan, (n, c, h, w),
                          SAMPLER, STEPS, torch.Generator().manual_seed(seed), (seed, 0), guide)
    x = torch.cat(list(chunks), dim=2)
    return data.to_photons(x[:, 0].double().numpy()).astype(np.float32)


Draw = Callable[[int, int, np.ndarray], np.ndarray]  # (n, seed, ROI map [H, W]) -> n photon samples [n, T, H, W]


def judge_masks(draw: Draw, tiles: Sequence[tuple[np.ndarray, np.ndarray]], preset: str, movie_side: int,
                frames: int, side: int, seeds: tuple[int, int, int]
                ) -> tuple[dict[str, Any], list[np.ndarray], np.ndarray]:
    """ROI recovery and the null test of ``draw``'s samples (clips or movies of ``frames`` frames).

    :data:`SAMPLES_PER_CONDITION` samples for each held-out tile's own ROIs (:func:`held_out_tiles`; seed
    ``seeds[0] + i``), matched to them with the detector that finds the real tiles' cells best (:func:`choose_detector`:
    the ceiling); 4x as many for an empty mask (seed ``seeds[1]``) beside as many real cell-free tiles
    (:func:`cell_free_tiles`, simulator seed ``seeds[2]``). Returns the scores, each tile's samples and the
    empty-mask samples."""
    k = SAMPLES_PER_CONDITION
    method, ceilings, _ = choose_detector(tiles)
    scores, samples = [], []
    for i, (_, rois) in enumerate(tiles):
        samples.append(draw(k, seeds[0] + i, rois.any(axis=0)))
        scores += [match_rois(detect_rois(m, method=method), rois) for m in samples[-1]]
    null = draw(4 * k, seeds[1], np.zeros((side, side), bool))
    null_real = cell_free_tiles(preset, len(null), frames, side, movie_side, seeds[2])
    return {"frames": frames, "tiles": len(tiles), "samples_per_mask": k, "detector": method,
            "detector_ceilings": ceilings, "roi": pool_matches(scores), "roi_ceiling": ceilings[method],
            "null_samples": len(null), "null_rois": int(sum(len(detect_rois(m, method=method)) for m in null)),
            "null_rois_real": int(sum(len(detect_rois(m, method=method)) for m in null_real))}, samples, null


FIGURE_TILES = 4  # held-out tiles drawn in the requested-against-detected figure (generation_masks.png)


def figure_arrays(tiles: Sequence[tuple[np.ndarray, np.ndarray]], samples: Sequence[np.ndarray], null: np.ndarray,
                  detector: str) -> dict[str, Any]:
    """What the requested-against-detected figure draws (``generation.write_figures``): the first
    :data:`FIGURE_TILES` tiles' mean images (real and the first sample for their mask), their requested ROIs and
    what ``detector`` finds on each, and the first empty-mask sample with its detections."""
    def found(movie: np.ndarray) -> np.ndarray:
        return detect_rois(movie, method=detector).any(axis=0)

    picks = range(min(FIGURE_TILES, len(tiles)))
    return {"detector": detector, "frames": int(null.shape[1]),
            "tiles": [{"requested": tiles[i][1].any(axis=0), "real": tiles[i][0].mean(axis=0), "real_found": found(tiles[i][0]),
                       "sample": samples[i][0].mean(axis=0), "sample_found": found(samples[i][0])} for i in picks],
            "null": null[0].mean(axis=0), "null_found": found(null[0])}


@torch.no_grad()
def roundtrip_flux(models: dict[str, Any], data: BenchData, clips: np.ndarray, fluxes: np.ndarray, target: float,
                   n: int, seed: int) -> dict[str, float]:
    """Stage 1 alone at a flux: the ``n`` training clips nearest ``target``, encoded and decoded - their mean flux
    before and after. A decoder that cannot reproduce a brightness bounds what any DiT condition can reach."""
    nearest = np.argsort(np.abs(np.log(fluxes / target)))[:n]
    x = torch.from_numpy(data.to_model(np.ascontiguousarray(clips[nearest])))[:, None]
    generator = torch.Generator().manual_seed(seed)
    recon = data.to_photons(models["ae"].decode(models["ae"].encode(x), generator=generator)[:, 0].double().numpy())
    return {"input": float(np.mean(fluxes[nearest])), "decoded": float(np.mean(recon))}


def first_frame_tiles(shape: Sequence[int], frames: int, side: int) -> list[tuple[int, int]]:
    """Origins ``(y0, x0)`` of the non-overlapping ``[frames, side, side]`` tiles of a movie's first clip length."""
    return [(y0, x0) for t0, y0, x0 in tile_origins(shape, frames, side) if t0 == 0]


def held_out_tiles(data: BenchData, frames: int, side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(real photon clip, requested ROIs [K, side, side]) of each first-frame tile of each held-out movie that has
    ROIs; ROIs cut below :data:`MIN_ROI_PIXELS` by the tile edge are dropped."""
    tiles = []
    for movie in data.held_out:
        for y0, x0 in first_frame_tiles(movie.photons.shape, frames, side):
            rois = movie.truth.rois[:, y0:y0 + side, x0:x0 + side]
            rois = rois[rois.sum(axis=(1, 2)) >= MIN_ROI_PIXELS]
            if len(rois):
                tiles.append((movie.photons[:frames, y0:y0 + side, x0:x0 + side], rois))
    return tiles


def choose_detector(tiles: Sequence[tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[str, dict[str, dict[str, Any]], list[np.ndarray]]:
    """The ROI detector samples are judged by: of :data:`cadiff.eval.rois.DETECTORS`, the one that finds the real
    tiles' own cells best (pooled F1 at IoU >= 0.5; ties go to the first). Chosen on real data only, never on the
    samples it then scores. Returns it, every detector's pooled score on the real tiles (the ceilings) and the
    chosen detector's ROIs on each tile."""
    found = {m: [detect_rois(real, method=m) for real, _ in tiles] for m in DETECTORS}
    ceilings = {m: pool_matches([match_rois(pred, rois) for pred, (_, rois) in zip(found[m], tiles)])
                for m in DETECTORS}
    method = max(DETECTORS, key=lambda m: ceilings[m]["f1"])
    return method, ceilings, found[method]


def cell_free_tiles(preset: str, count: int, frames: int, side: int, movie_side: int, seed: int) -> list[np.ndarray]:
    """``count`` photon tiles ``[frames, side, side]`` of the preset's movies with no neurons (first-frame tiles of
    as many movies as needed): what a detector finds on them is the null test's reference."""
    tiles: list[np.ndarray] = []
    i = 0
    while len(tiles) < count:
        movie, _ = simulate_movie(preset, frames, movie_side, movie_side, seed=seed + i, num_neurons=0,
                                  return_clean=False)
        photons = to_photons(movie.data, movie.gain, movie.offset)
        tiles += [photons[:frames, y0:y0 + side, x0:x0 + side]
                  for y0, x0 in first_frame_tiles(photons.shape, frames, side)]
        i += 1
    return tiles[:count]


def _contrast(clips: Sequence[np.ndarray], rois: np.ndarray) -> float | None:
    union = rois.any(axis=0)
    if not len(clips) or union.all() or not union.any():
        return None
    return float(np.mean([roi_contrast(c, rois)["contrast"] for c in clips]))


def conditioning_run(models: dict[str, Any], data: BenchData, bright: tuple[list[np.ndarray], list[np.ndarray]],
                     preset: str, movie_side: int, frames: int, side: int, steps: int, batch: int, seed: int,
                     unconditional: np.ndarray, movie_frames: int) -> dict[str, Any]:
    """Train the conditioned DiT on the brightness-varied movies ``bright`` (:func:`brightness_movies`: photon
    movies and their ROI unions) and measure ROI recovery, the null test and flux following (module docstring).
    ``unconditional``: photon clips of the unconditional DiT (the control); ``movie_frames``: the length of the
    mask-conditioned movies the summary's ROI keys judge: a mean image of a 17-frame clip at 0.15 photons per pixel
    per frame holds ~2.5 photons per pixel, too few for a detector to find even the real tiles' cells (ceiling F1
    0.66 in the full run); a movie of the held-out length (253 frames, 8.4 s at 30 Hz) holds 15x more."""
    start = time.perf_counter()
    train_clips, masks, fluxes = training_conditions(*bright, frames, side)
    latents = normalize_latents(encode(models["ae"], train_clips, data), models["stats"])
    dit, info = train_dit(with_conditions(latents, masks, fluxes), steps, seed + 1, batch=batch,
                          overrides=COND_OVERRIDES, conditions=CONDITIONS)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    k = SAMPLES_PER_CONDITION
    median_flux = float(np.median(fluxes))  # what encode_latents records as flux_median: masks are held at it
    tiles = held_out_tiles(data, frames, side)
    clip, clip_samples, _ = judge_masks(lambda n, s, m: sample(dit, models, data, n, s, mask=m, flux=median_flux),
                                        tiles, preset, movie_side, frames, side, (seed + 100, seed + 7, seed * 1000 + 900))
    contrasts, real_contrasts, control_contrasts = [], [], []
    for i, ((real, rois), clips) in enumerate(zip(tiles, clip_samples)):
        for values, group in ((contrasts, clips), (real_contrasts, [real]),
                              (control_contrasts, unconditional[i * k:(i + 1) * k])):
            c = _contrast(group, rois)
            if c is not None:
                values.append(c)
    flux_rows = []
    for j, factor in enumerate(FLUX_FACTORS):
        requested = factor * median_flux
        per_clip = sample(dit, models, data, FLUX_SAMPLES, seed + 200 + j, flux=requested).mean(axis=(1, 2, 3))
        measured = float(np.mean(per_clip))
        flux_rows.append({"factor": factor, "requested": requested, "measured": measured,
                          "rel_err": abs(measured / requested - 1.0), "samples": FLUX_SAMPLES,
                          "rel_se": float(np.std(per_clip, ddof=1) / np.sqrt(FLUX_SAMPLES)) / requested,
                          "stage1_roundtrip": roundtrip_flux(models, data, train_clips, fluxes, requested, k, seed)})
    movie_tiles = held_out_tiles(data, movie_frames, side)
    movie, movie_samples, movie_null = judge_masks(
        lambda n, s, m: sample_movies(dit, models, data, n, movie_frames, s, m, median_flux), movie_tiles, preset,
        movie_side, movie_frames, side, (seed + 300, seed + 8, seed * 1000 + 950))
    measurable = movie["roi_ceiling"]["f1"] >= MIN_CEILING_F1
    result = {
        "roi_f1": movie["roi"]["f1"] if measurable else None,
        "null_rois": movie["null_rois"] if measurable else None,
        "gain_cond_max_err": max(r["rel_err"] for r in flux_rows), "movie": movie,
        "roi_f1_measured": clip["roi"]["f1"], "null_rois_measured": clip["null_rois"],
        **{key: clip[key] for key in ("null_rois_real", "detector", "detector_ceilings", "roi", "roi_ceiling", "tiles",
                                      "samples_per_mask", "null_samples")},
        "contrast": float(np.mean(contrasts)) if contrasts else None,
        "contrast_real": float(np.mean(real_contrasts)) if real_contrasts else None,
        "contrast_unconditional": float(np.mean(control_contrasts)) if control_contrasts else None,
        "flux": flux_rows, "median_training_flux": median_flux, "mask_flux_held": median_flux,
        "training_flux_p5_p95": [float(v) for v in np.percentile(fluxes, [5, 95])],
        "guidance_scale": GUIDANCE, "dit": {"steps": info["steps"], "seconds": info["seconds"],
                                            "final_loss": info["final_loss"]},
        "train_s": train_s, "sample_s": time.perf_counter() - start,
        "figure": figure_arrays(movie_tiles, movie_samples, movie_null, movie["detector"]),  # arrays: not in the JSON
    }
    if not measurable:
        result["reason"] = (f"not measurable here: no detector finds the cells of the real held-out {movie_frames}-frame"
                            f" tiles at F1 >= {MIN_CEILING_F1} (best: {movie['detector']} image, F1 "
                            f"{movie['roi_ceiling']['f1']:.2f}), so samples cannot be judged by it; see conditioning "
                            "in the JSON for the raw values")
    log.info("conditioned DiT: ROI F1 %.3f on %d-frame movies (ceiling %.3f), %.3f on %d-frame clips (%s-image "
             "detector, ceiling %.3f), contrast %s (real %s, unconditional %s), null ROIs %d movies / %d clips (real "
             "cell-free: %d / %d), flux max rel err %.3f", movie["roi"]["f1"], movie_frames, movie["roi_ceiling"]["f1"],
             clip["roi"]["f1"], frames, clip["detector"], clip["roi_ceiling"]["f1"], result["contrast"],
             result["contrast_real"], result["contrast_unconditional"], movie["null_rois"], clip["null_rois"],
             movie["null_rois_real"], clip["null_rois_real"],
             result["gain_cond_max_err"])
    return result
