"""The conditioned half of the generation benchmark: training conditions line up with the training latents, the
condition channels are the latent pipeline's, held-out tiles ask only for cells they show, F1 pools over samples."""

from __future__ import annotations

import numpy as np
import torch

from cadiff.bench import conditioning as C
from cadiff.bench.ae_quality import BenchData, HeldOut, cut_clips, tile_origins
from cadiff.bench.generation import flips
from cadiff.data.conditioning import clip_flux, flux_value, mask_planes
from cadiff.data.movie import to_photons
from cadiff.data.simulate import simulate_movie


def _held_out(side: int = 64) -> BenchData:
    movie, truth = simulate_movie("default", 17, side, side, seed=99)
    return BenchData([], [HeldOut(movie.data.astype(np.float32), truth)], 0.0, 1.0, 10.0)


def test_brightness_movies_span_the_factor_range_with_their_cells():
    movies, rois = C.brightness_movies("two_photon", 6, 17, 32, seed=5)
    means = np.array([m.mean() for m in movies])
    assert len(rois) == 6 and all(r.shape == (32, 32) and r.any() for r in rois)
    assert means.max() / means.min() > 2.5  # factors over 0.3-3x: the preset alone spans ~1.2x


def test_training_conditions_follow_the_clips_tile_and_flip_order():
    movies, rois = C.brightness_movies("default", 2, 34, 64, seed=0)
    clips, masks, fluxes = C.training_conditions(movies, rois, 17, 32)
    expected_clips = flips(np.concatenate([cut_clips(m, tile_origins(m.shape, 17, 32), 17, 32) for m in movies]))
    np.testing.assert_array_equal(clips, expected_clips)
    assert len(masks) == len(fluxes) == len(clips) == 2 * 2 * 4 * 4  # movies x time tiles x space tiles x flips
    for i in (0, 5, 17, 40, 63):  # each mask is its clip's tile of the movie's ROI union, flipped alike
        movie, tile = divmod(i % 16, 8)
        _, y0, x0 = tile_origins(movies[movie].shape, 17, 32)[tile]
        base = rois[movie][y0:y0 + 32, x0:x0 + 32]
        flip = i // 16
        expected = base[::-1] if flip == 1 else base[:, ::-1] if flip == 2 else base[::-1, ::-1] if flip == 3 else base
        np.testing.assert_array_equal(masks[i], expected)
        assert fluxes[i] == clip_flux(clips[i])


def test_condition_channels_are_the_latent_pipelines():
    latents = torch.zeros(3, 4, 3, 4, 4)
    masks = np.zeros((3, 32, 32), bool)
    masks[1, :8, :8] = True
    out = C.with_conditions(latents, masks, np.array([1.0, 10.0, 100.0]), mask_subgrid=1)
    assert out.shape == (3, 6, 3, 4, 4)
    np.testing.assert_allclose(out[1, 4, 0].numpy(), mask_planes(masks[1], (4, 4))[0])
    assert float(out[2, 5, 1, 2, 2]) == np.float32(flux_value(100.0))
    # the benchmark's own setting: the mask as MASK_SUBGRID^2 sub-block planes, then the flux
    planes = C.MASK_SUBGRID ** 2
    out = C.with_conditions(latents, masks, np.array([1.0, 10.0, 100.0]))
    assert out.shape == (3, 4 + planes + 1, 3, 4, 4)
    np.testing.assert_allclose(out[1, 4:4 + planes, 0].numpy(), mask_planes(masks[1], (4, 4), C.MASK_SUBGRID))
    assert float(out[2, 4 + planes, 1, 2, 2]) == np.float32(flux_value(100.0))


def test_held_out_tiles_ask_only_for_cells_they_show_and_f1_pools_over_samples():
    tiles = C.held_out_tiles(_held_out(), 17, 32)
    assert tiles and all(real.shape == (17, 32, 32) and rois.shape[1:] == (32, 32) for real, rois in tiles)
    assert all((rois.sum(axis=(1, 2)) >= C.MIN_ROI_PIXELS).all() for _, rois in tiles)
    pooled = C.pool_matches([{"hits": 1, "n_pred": 2, "n_true": 2}, {"hits": 1, "n_pred": 1, "n_true": 3}])
    assert (pooled["precision"], pooled["recall"]) == (2 / 3, 2 / 5)
    assert C.pool_matches([{"hits": 0, "n_pred": 0, "n_true": 2}])["f1"] == 0.0


def test_the_detector_is_chosen_on_real_tiles_and_cell_free_tiles_span_movies():
    # two_photon cells are too dim for the correlation image in short clips; the mean image finds them, so the
    # benchmark judges samples with it (chosen on the real tiles, never on the samples)
    movie, truth = simulate_movie("two_photon", 65, 64, 64, seed=11, return_clean=False)
    photons = to_photons(movie.data, movie.gain, movie.offset)
    tiles = [(photons, truth.rois)]
    method, ceilings, found = C.choose_detector(tiles)
    assert set(ceilings) == {"correlation", "mean"} and method == "mean"
    assert len(found) == 1 and found[0].shape[1:] == (64, 64)
    assert C.match_rois(found[0], truth.rois)["hits"] == ceilings["mean"]["hits"]  # the chosen detector's own ROIs
    assert ceilings["mean"]["f1"] > ceilings["correlation"]["f1"] and ceilings["mean"]["n_true"] == len(truth.rois)
    free = C.cell_free_tiles("two_photon", 5, 17, 32, 64, seed=3)
    assert len(free) == 5 and all(t.shape == (17, 32, 32) for t in free)
    assert not np.array_equal(free[0], free[4])  # the fifth tile comes from a second movie


def _untrained_pair() -> tuple[dict, BenchData]:
    """A mask-conditioned tiny DiT and a tiny stage 1, untrained, with non-zero output weights."""
    from cadiff.config import compose
    from cadiff.models.registry import build_model

    torch.manual_seed(0)
    dit = build_model({"kind": "dit", "size": "tiny", "in_channels": 4, "cond_mask": True,
                       "conditions": ["roi_mask"]}).eval()
    torch.nn.init.normal_(dit.dit.final_layer.linear.weight, std=0.05)
    for block in dit.dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(dit.dit.x_embedder.proj.weight, std=0.5)
    noise = ["model.noise_model.kind=anscombe", "model.noise_model.center=4.0", "model.noise_model.scale=0.5",
             "model.noise_model.read_noise_photons=0.2"]  # what the trainer fills in from the data index
    ae = build_model(compose("train_ae", ["experiment=ae_tiny", *noise]).model).eval()
    torch.nn.init.normal_(ae.mean_decoder.conv_out.conv.weight, std=0.1)  # zero-initialized: would ignore z
    models = {"ae": ae, "dit": dit, "latent": [4, 5, 4, 4], "stats": (torch.zeros(4), torch.ones(4))}
    return models, BenchData([], [], 0.0, 1.0, 10.0)


def test_mask_conditioned_movies_roll_out_past_a_clip_reproducibly_and_follow_the_mask():
    # an untrained pair with non-zero output weights: the movie has the requested length (two rollout chunks past
    # the 17-frame clip), the seed fixes it, and the mask reaches the DiT (another mask, another movie)
    models, data = _untrained_pair()
    dit = models["dit"]
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    with torch.no_grad():
        movies = C.sample_movies(dit, models, data, 2, 33, seed=4, mask=mask)
        again = C.sample_movies(dit, models, data, 2, 33, seed=4, mask=mask)
        other = C.sample_movies(dit, models, data, 2, 33, seed=4, mask=~mask)
    assert movies.shape == (2, 33, 32, 32) and np.isfinite(movies).all()
    np.testing.assert_array_equal(movies, again)
    assert not np.allclose(movies, other)


def test_movies_plan_their_windows_from_the_pairs_measured_reach(monkeypatch):
    # the generation benchmark measures the decoder's reach once per trained pair; movies do not probe it again
    models, data = _untrained_pair()
    reach = models["ae"].latent_reach()
    models["reach"] = reach

    def probe_again(*args, **kwargs):
        raise AssertionError("sample_movies probed the decoder's reach again")

    monkeypatch.setattr(type(models["ae"]), "latent_reach", probe_again)
    mask = np.zeros((32, 32), bool)
    with torch.no_grad():
        movies = C.sample_movies(models["dit"], models, data, 1, 33, seed=4, mask=mask)
    assert movies.shape == (1, 33, 32, 32)


def test_judge_masks_scores_samples_against_the_real_tiles_ceiling_and_the_null_test():
    # a "generator" that returns the real tile for its mask scores exactly the ceiling; an empty-mask draw of
    # cell-free noise finds what the detector finds on real cell-free tiles of the same seed
    movie, truth = simulate_movie("two_photon", 65, 64, 64, seed=11, return_clean=False)
    data = BenchData([], [HeldOut(to_photons(movie.data, movie.gain, movie.offset), truth)], 0.0, 1.0, 30.0)
    tiles = C.held_out_tiles(data, 65, 32)
    calls = []

    def draw(n: int, seed: int, mask: np.ndarray) -> np.ndarray:
        calls.append((n, seed, bool(mask.any())))
        if not mask.any():
            return np.stack(C.cell_free_tiles("two_photon", n, 65, 32, 64, seed=7))
        real = next(r for r, rois in tiles if np.array_equal(rois.any(axis=0), mask))
        return np.stack([real] * n)

    scores, samples, null = C.judge_masks(draw, tiles, "two_photon", 64, 65, 32, (100, 5, 7))
    k = C.SAMPLES_PER_CONDITION
    assert calls == [(k, 100 + i, True) for i in range(len(tiles))] + [(4 * k, 5, False)]
    assert [len(s) for s in samples] == [k] * len(tiles) and scores["tiles"] == len(tiles)
    ceiling = scores["roi_ceiling"]
    assert scores["roi"]["hits"] == k * ceiling["hits"] and scores["roi"]["f1"] == ceiling["f1"] > 0.5
    assert scores["null_samples"] == 4 * k and scores["null_rois"] == scores["null_rois_real"]
    # the figure's arrays: a sample that is the real tile finds what the real tile finds
    fig = C.figure_arrays(tiles, samples, null, scores["detector"])
    assert len(fig["tiles"]) == min(C.FIGURE_TILES, len(tiles)) and fig["frames"] == 65
    first = fig["tiles"][0]
    np.testing.assert_array_equal(first["sample_found"], first["real_found"])
    np.testing.assert_array_equal(first["requested"], tiles[0][1].any(axis=0))
    assert first["real_found"].any() and fig["null"].shape == (32, 32) and fig["null_found"].dtype == bool


def test_mask_guide_holds_the_flux_when_the_dit_takes_one():
    # the benchmark samples masks as the sample job does: guided alone, at the held flux given to both branches
    from cadiff.data.conditioning import flux_value
    from cadiff.models.registry import build_model

    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    both = build_model({"kind": "dit", "size": "tiny", "in_channels": 4, "cond_mask": True, "cond_flux": True,
                        "conditions": ["roi_mask", "flux"]})
    guide = C.mask_guide(both, mask, (4, 4), 3, 0.12)
    assert guide["guided"] == ["roi_mask"] and guide["guidance_scale"] == C.GUIDANCE
    torch.testing.assert_close(guide["conditions"]["flux"], torch.full((3,), flux_value(0.12)))
    assert guide["conditions"]["roi_mask"].shape[0] == 3
    assert "guided" not in C.mask_guide(both, mask, (4, 4), 3, None)  # no flux to hold: the mask alone, as before
    mask_only = build_model({"kind": "dit", "size": "tiny", "in_channels": 4, "cond_mask": True,
                             "conditions": ["roi_mask"]})
    assert set(C.mask_guide(mask_only, mask, (4, 4), 3, 0.12)["conditions"]) == {"roi_mask"}


def test_sample_without_mask_or_flux_is_unconditional():
    # neither condition given: an unconditional draw (the model's null condition), reproducible by its seed, not
    # the masked one
    models, data = _untrained_pair()
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    free = C.sample(models["dit"], models, data, 2, seed=3)
    np.testing.assert_array_equal(free, C.sample(models["dit"], models, data, 2, seed=3))
    masked = C.sample(models["dit"], models, data, 2, seed=3, mask=mask)
    assert free.shape == masked.shape and free.shape[0] == 2 and np.isfinite(free).all()
    assert not np.allclose(free, masked)
