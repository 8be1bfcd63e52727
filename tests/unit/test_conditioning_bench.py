"""The conditioned half of the generation benchmark: training conditions line up with the training latents, the
condition channels are the latent pipeline's, held-out tiles ask only for cells they show, F1 pools over samples."""

from __future__ import annotations

import numpy as np
import torch

from cadiff.bench import conditioning as C
from cadiff.bench.ae_quality import BenchData, HeldOut, cut_clips, tile_origins
from cadiff.bench.generation import flips
from cadiff.data.conditioning import clip_flux, flux_value, to_grid
from cadiff.data.simulate import simulate_movie


def _data(movies: int = 2, frames: int = 34, side: int = 64) -> BenchData:
    train, rois, held = [], [], []
    for i in range(movies):
        movie, truth = simulate_movie("default", frames, side, side, seed=i, return_clean=False)
        train.append(movie.data.astype(np.float32))
        rois.append(truth.rois.any(axis=0))
    movie, truth = simulate_movie("default", 17, side, side, seed=99)
    held.append(HeldOut(movie.data.astype(np.float32), truth))
    return BenchData(train, held, 0.0, 1.0, 10.0, train_rois=rois)


def test_training_conditions_follow_the_latents_tile_and_flip_order():
    data = _data()
    masks, fluxes = C.training_conditions(data, 17, 32)
    clips = flips(np.concatenate([cut_clips(m, tile_origins(m.shape, 17, 32), 17, 32) for m in data.train]))
    assert len(masks) == len(fluxes) == len(clips) == 2 * 2 * 4 * 4  # movies x time tiles x space tiles x flips
    for i in (0, 5, 17, 40, 63):  # each mask is its clip's tile of the movie's ROI union, flipped alike
        j = i % 16
        movie, tile = divmod(j, 8)
        t0, y0, x0 = tile_origins(data.train[movie].shape, 17, 32)[tile]
        base = data.train_rois[movie][y0:y0 + 32, x0:x0 + 32]
        flip = i // 16
        expected = base[::-1] if flip == 1 else base[:, ::-1] if flip == 2 else base[::-1, ::-1] if flip == 3 else base
        np.testing.assert_array_equal(masks[i], expected)
        assert fluxes[i] == clip_flux(clips[i])


def test_condition_channels_are_the_latent_pipelines():
    latents = torch.zeros(3, 4, 3, 4, 4)
    masks = np.zeros((3, 32, 32), bool)
    masks[1, :8, :8] = True
    out = C.with_conditions(latents, masks, np.array([1.0, 10.0, 100.0]))
    assert out.shape == (3, 6, 3, 4, 4)
    np.testing.assert_allclose(out[1, 4, 0].numpy(), to_grid(masks[1], (4, 4)))
    assert float(out[2, 5, 1, 2, 2]) == np.float32(flux_value(100.0))


def test_held_out_tiles_ask_only_for_cells_they_show_and_f1_pools_over_samples():
    data = _data(movies=1)
    tiles = C.held_out_tiles(data, 17, 32)
    assert tiles and all(real.shape == (17, 32, 32) and rois.shape[1:] == (32, 32) for real, rois in tiles)
    assert all((rois.sum(axis=(1, 2)) >= C.MIN_ROI_PIXELS).all() for _, rois in tiles)
    pooled = C._pooled([{"hits": 1, "n_pred": 2, "n_true": 2}, {"hits": 1, "n_pred": 1, "n_true": 3}])
    assert (pooled["precision"], pooled["recall"]) == (2 / 3, 2 / 5)
    assert C._pooled([{"hits": 0, "n_pred": 0, "n_true": 2}])["f1"] == 0.0
