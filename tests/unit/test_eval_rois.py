"""ROI detectors (correlation image, mean image) and IoU matcher: simulated cells are found, noise and empty fields
give none."""

from __future__ import annotations

import numpy as np
import pytest

from cadiff.data.movie import to_photons
from cadiff.data.simulate import simulate_movie
from cadiff.errors import DataError
from cadiff.eval.rois import _flood, detect_rois, iou_matrix, match_rois, pool_matches


def disk(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


@pytest.mark.parametrize("seed", [1, 2])
def test_detector_finds_simulated_cells(seed):
    movie, truth = simulate_movie("default", frames=400, height=64, width=64, seed=seed)
    pred = detect_rois(movie.data)
    score = match_rois(pred, truth.rois, iou=0.5)
    print(f"ROI F1 (default preset, 400 frames, seed {seed}): {score}")
    assert pred.dtype == bool and pred.shape[1:] == (64, 64)
    assert score["n_true"] == len(truth.rois)
    assert score["f1"] >= 0.75 and score["precision"] >= 0.8


@pytest.mark.parametrize("frames", [20, 400])
def test_pure_noise_gives_no_rois(frames):
    noise = np.random.default_rng(frames).poisson(5.0, size=(frames, 64, 64)).astype(np.float32)
    assert detect_rois(noise).shape == (0, 64, 64)


@pytest.mark.parametrize("no_cells", [{"neuron_photons": 0.0}, {"num_neurons": 0}])
def test_field_without_cells_gives_no_rois(no_cells):
    # neuropil background with its slow drift and fluctuations but dark or no neurons: nothing to detect
    movie, truth = simulate_movie("default", frames=300, height=48, width=48, seed=3, **no_cells)
    assert len(detect_rois(movie.data)) == 0
    assert match_rois(detect_rois(movie.data), truth.rois)["n_true"] == len(truth.rois)


def test_match_counts_hits_at_iou_threshold():
    a, b, c = disk((32, 32), (8, 8), 4), disk((32, 32), (20, 20), 4), disk((32, 32), (8, 10), 4)
    true = np.stack([a, b])
    assert match_rois(true, true) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "hits": 2, "n_pred": 2, "n_true": 2}
    overlap = iou_matrix(c[None], a[None])[0, 0]
    assert 0 < overlap < 1
    shifted = match_rois(np.stack([c]), true, iou=overlap)  # exactly at the threshold: a hit
    assert shifted["precision"] == 1.0 and shifted["recall"] == 0.5 and shifted["f1"] == pytest.approx(2 / 3)
    assert match_rois(np.stack([c]), true, iou=min(1.0, overlap + 1e-6))["f1"] == 0.0
    empty = np.zeros((0, 32, 32), bool)
    assert match_rois(empty, true)["f1"] == 0.0 and match_rois(empty, empty)["n_pred"] == 0


def test_one_to_one_matching():
    a = disk((32, 32), (10, 10), 4)
    result = match_rois(np.stack([a, a]), a[None])
    assert result["precision"] == 0.5 and result["recall"] == 1.0


def test_bad_inputs_name_the_argument():
    with pytest.raises(DataError, match="pred.*expected bool masks"):
        match_rois(np.zeros((2, 8, 8)), np.zeros((1, 8, 8), bool))
    with pytest.raises(DataError, match=r"pred frame \(8, 8\) != true frame \(9, 9\)"):
        match_rois(np.zeros((1, 8, 8), bool), np.zeros((1, 9, 9), bool))
    with pytest.raises(DataError, match="iou=0"):
        match_rois(np.zeros((1, 8, 8), bool), np.zeros((1, 8, 8), bool), iou=0)
    with pytest.raises(DataError, match="detect_rois movie: shape"):
        detect_rois(np.zeros((10, 8)))
    with pytest.raises(DataError, match="footprint_fraction=1"):
        detect_rois(np.zeros((10, 8, 8)), footprint_fraction=1)
    with pytest.raises(DataError, match="method='anatomy'.*method one of"):
        detect_rois(np.zeros((10, 8, 8)), method="anatomy")


def test_flood_splits_two_bumps_on_their_valley():
    # two equal bumps 16 px apart: each pixel belongs to the nearer one (the valley is the midline). scipy's
    # watershed_ift, used before, gave one seed most of a simulated field and cut real cells to a few pixels
    yy, xx = np.mgrid[:32, :48].astype(float)
    height = np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 18) + np.exp(-((yy - 16) ** 2 + (xx - 32) ** 2) / 18)
    labels = _flood(height, np.array([[16, 16], [16, 32]]))
    assert (labels[:, :24] == 1).all() and (labels[:, 25:] == 2).all() and set(np.unique(labels)) == {1, 2}


def test_mean_image_detector_finds_dim_cells_the_correlation_image_cannot():
    # two_photon: ~0.1-0.4 photons per pixel per frame. Cells are brighter than the neuropil at rest, which a mean
    # image shows in a few hundred frames, while their activity is buried in shot noise (no correlation seed)
    movie, truth = simulate_movie("two_photon", frames=257, height=64, width=64, seed=500, return_clean=False)
    photons = to_photons(movie.data, movie.gain, movie.offset)
    assert len(detect_rois(photons)) == 0
    score = match_rois(detect_rois(photons, method="mean"), truth.rois)
    print(f"mean-image ROI F1 (two_photon, 257 frames): {score}")
    assert score["f1"] >= 0.6 and score["precision"] >= 0.8


def test_mean_image_detector_splits_two_overlapping_cells():
    # two sigma-2.5 px cells 6 px apart (their footprints >= 0.3 overlap): the smoothed mean image has one peak
    # between them and gave one ROI matching neither; the Laplacian-of-Gaussian seeds give each cell its own
    yy, xx = np.mgrid[:32, :32].astype(float)
    footprints = np.stack([np.exp(-((yy - 16) ** 2 + (xx - cx) ** 2) / (2 * 2.5**2)) for cx in (13, 19)])
    assert (footprints[0] >= 0.3)[footprints[1] >= 0.3].any()
    flux = 0.5 + 1.5 * footprints.sum(axis=0)
    movie = np.random.default_rng(0).poisson(np.broadcast_to(flux, (200, 32, 32))).astype(np.float32)
    score = match_rois(detect_rois(movie, method="mean"), footprints >= 0.3)
    assert score["hits"] == 2 and score["n_pred"] == 2, score


@pytest.mark.parametrize("frames", [20, 400])
def test_mean_image_detector_finds_nothing_in_noise_or_a_cell_free_field(frames):
    noise = np.random.default_rng(frames).poisson(5.0, size=(frames, 64, 64)).astype(np.float32)
    assert detect_rois(noise, method="mean").shape == (0, 64, 64)
    movie, _ = simulate_movie("default", frames=frames, height=64, width=64, seed=3, num_neurons=0)
    assert len(detect_rois(movie.data.astype(np.float32), method="mean")) == 0


def test_mean_image_detector_ignores_shot_noise_peaks_of_short_dim_clips():
    # 17-frame tiles of two_photon fields without cells (~1.7 photons per pixel in the mean image): every peak is
    # noise or neuropil. A seed test alone passes about one per two tiles; the ROI's summed excess does not (on
    # 1000 such tiles: 22 ROIs with the LoG seeds, 18 with the smoothed mean image's). 64 tiles of 16 movies, each
    # movie either without cells or with dark ones (the same field otherwise)
    false = 0
    for seed in range(16):
        kw = {"neuron_photons": 0.0} if seed % 2 else {"num_neurons": 0}
        movie, _ = simulate_movie("two_photon", 17, 64, 64, seed=900 + seed, return_clean=False, **kw)
        photons = to_photons(movie.data, movie.gain, movie.offset)
        false += sum(len(detect_rois(photons[:, y:y + 32, x:x + 32], method="mean")) for y in (0, 32) for x in (0, 32))
    assert false <= 4


def test_mean_image_detector_finds_most_cells_of_two_photon_tiles():
    # the judge of mask-conditioned samples (benchmarks/generation.py): 32x32 tiles of 253-frame two_photon movies,
    # ground-truth ROIs cut by a tile edge to < 12 px not asked for. F1 0.837 (precision 0.968, recall 0.738);
    # 0.761 (0.940, 0.639) with the 8 px background and z = 4 of before, which fails here
    scores = []
    for seed in range(600, 608):
        movie, truth = simulate_movie("two_photon", frames=253, height=64, width=64, seed=seed, return_clean=False)
        photons = to_photons(movie.data, movie.gain, movie.offset)
        for y in (0, 32):
            for x in (0, 32):
                rois = truth.rois[:, y:y + 32, x:x + 32]
                rois = rois[rois.sum(axis=(1, 2)) >= 12]
                scores.append(match_rois(detect_rois(photons[:, y:y + 32, x:x + 32], method="mean"), rois))
    score = pool_matches(scores)
    assert score["f1"] >= 0.8 and score["precision"] >= 0.9, score
