"""The suite2p judge's own maths and inputs, without running suite2p: int16 conversion, ROI SNR, ROI masks,
per-set summaries, F1 pooling, the comparison and its split-half baseline, the loaders' refusals and the config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from cadiff.config import Suite2pJudgeConfig, compose
from cadiff.errors import ConfigError, DataError
from cadiff.eval.report import Document, _suite2p_section
from cadiff.eval.suite2p_judge import (
    Detection,
    JudgeMovie,
    compare_detections,
    load_judge_movies,
    roi_snr,
    stat_masks,
    summarize_detections,
    to_int16,
)


def test_to_int16_keeps_values_that_fit_and_shifts_or_scales_the_rest():
    x = np.array([[[0, 100], [32767, 5]]], dtype=np.uint16)
    y, scale = to_int16(x)
    assert y.dtype == np.int16 and scale == 1.0 and np.array_equal(y, x.astype(np.int16))
    big = np.array([[[40000, 40010], [40020, 40030]]], dtype=np.uint16)
    y, scale = to_int16(big)
    assert scale == 1.0 and np.array_equal(y.ravel(), [0, 10, 20, 30])  # shifted: differences kept exactly
    wide = np.array([[[0, 65535]]], dtype=np.uint16)
    y, scale = to_int16(wide)
    assert scale == pytest.approx(32767 / 65535) and y.max() == 32767 and y.min() == 0
    processed = np.array([[[0.0, 0.5], [1.0, 2.0]]], dtype=np.float32)  # dF/F-like floats: rounding would flatten
    y, scale = to_int16(processed)
    assert scale == pytest.approx(32767 / 2) and np.array_equal(y.ravel(), [0, 8192, 16384, 32767])
    with pytest.raises(DataError, match="NaN"):
        to_int16(np.array([[[np.nan, 1.0]]]))


def test_roi_snr_is_peak_over_frame_to_frame_noise():
    rng = np.random.default_rng(0)
    t = 2000
    noise = rng.normal(0, 2.0, size=(2, t))
    events = np.zeros(t)
    events[::100] = 1.0
    transient = np.convolve(events, np.exp(-np.arange(30) / 8.0))[:t] * 40.0
    f = noise + np.stack([np.zeros(t), transient]) + 100.0
    fneu = np.full((2, t), 50.0)  # a constant neuropil only shifts F - 0.7 Fneu
    snr = roi_snr(f, fneu)
    # pure noise: p99 - median of N(0, 2) is 2.33 sigma; the MAD of the differences recovers sigma
    assert snr[0] == pytest.approx(2.326, rel=0.1)
    assert snr[1] > 5 * snr[0]
    assert np.array_equal(roi_snr(np.zeros((0, 5)), np.zeros((0, 5))), np.zeros(0))


def test_stat_masks_keep_pixels_above_the_ground_truth_fraction_of_the_peak():
    stat = [{"ypix": np.array([0, 0, 1]), "xpix": np.array([0, 1, 1]), "lam": np.array([1.0, 0.3, 0.29])}]
    masks = stat_masks(stat, (3, 3))
    assert masks.shape == (1, 3, 3) and masks.dtype == bool
    assert masks[0].sum() == 2 and masks[0, 0, 0] and masks[0, 0, 1] and not masks[0, 1, 1]


def _square(h, w, y, x, size=4) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y:y + size, x:x + size] = True
    return m


def _detection(masks, snr=None) -> Detection:
    masks = np.asarray(masks, bool).reshape(-1, 16, 16)
    n = len(masks)
    return Detection(masks, masks.reshape(n, 256).sum(1).astype(float), np.asarray(snr if snr is not None else np.ones(n), float),
                     np.linspace(0.2, 0.9, n) if n else np.zeros(0))


def test_summaries_pool_f1_over_movies_and_report_density_and_quartiles():
    a, b, c = _square(16, 16, 0, 0), _square(16, 16, 8, 8), _square(16, 16, 0, 10)
    movies = [JudgeMovie("m0", np.zeros((10, 16, 16)), 30.0, np.stack([a, b])),
              JudgeMovie("m1", np.zeros((10, 16, 16)), 30.0, np.stack([c]))]
    # m0: one hit of two true, one false positive; m1: one hit
    dets = [_detection([a, _square(16, 16, 4, 4)], snr=[2.0, 4.0]), _detection([c], snr=[6.0])]
    summary = summarize_detections(movies, dets, iou=0.5)
    assert summary["rois"] == 3 and summary["movies"] == 2 and summary["pixels"] == 512
    assert summary["density_per_10k_px"] == pytest.approx(3 / 512 * 1e4)
    assert summary["snr"]["median"] == 4.0 and summary["size_px"]["median"] == 16.0
    truth = summary["truth"]
    assert (truth["n_pred"], truth["n_true"]) == (3, 3)
    assert truth["precision"] == pytest.approx(2 / 3) and truth["recall"] == pytest.approx(2 / 3)
    assert truth["f1"] == pytest.approx(2 / 3) and truth["per_movie"]["m1"]["f1"] == 1.0
    # without ground truth there is no F1, and no ROIs at all is a valid (empty) result
    no_truth = summarize_detections([JudgeMovie("g", np.zeros((10, 16, 16)), 30.0)], [_detection([])], iou=0.5)
    assert no_truth["truth"] is None and no_truth["rois"] == 0 and no_truth["snr"]["median"] is None
    assert no_truth["density_per_10k_px"] == 0.0 and no_truth["cell_fraction"] is None


def test_comparison_is_zero_for_identical_sets_and_has_a_split_half_baseline():
    rng = np.random.default_rng(1)
    dets = [_detection([_square(16, 16, *rng.integers(0, 12, 2))] * 3, snr=rng.uniform(1, 9, 3)) for _ in range(4)]
    movies = [JudgeMovie(f"m{i}", np.zeros((10, 16, 16)), 30.0) for i in range(4)]
    s = summarize_detections(movies, dets, 0.5)
    same = compare_detections(s, s, dets, dets)
    assert same["density_ratio"] == 1.0 and same["size_ks"] == 0.0 and same["snr_ks"] == 0.0
    assert same["snr_ks_baseline"] is not None and same["size_ks_baseline"] == 0.0
    brighter = [Detection(d.masks, d.npix, d.snr + 100, d.iscell) for d in dets]
    cmp_ = compare_detections(summarize_detections(movies, brighter, 0.5), s, brighter, dets)
    assert cmp_["snr_ks"] == 1.0 and cmp_["snr_median_ratio"] > 10
    empty = summarize_detections(movies[:1], [_detection([])], 0.5)
    one = compare_detections(empty, summarize_detections(movies[:1], dets[:1], 0.5), [_detection([])], dets[:1])
    assert one["density_ratio"] == 0.0 and one["size_ks"] is None and one["size_ks_baseline"] is None
    doc = Document("t")
    _suite2p_section(doc, {"settings": {"tau": 1.0, "spatial_scale": 1, "threshold_scaling": 1.0, "iou": 0.5},
                           "gen": empty, "ref": s, "compare": one})
    text = doc.markdown()
    assert "suite2p judge" in text and "no ground truth" in text and "n/a" in text


def test_loaders_take_whole_movies_with_their_truth_and_refuse_clips(tmp_path):
    folder = tmp_path / "export"
    (folder / "tiff").mkdir(parents=True)
    (folder / "export.json").write_text("{}")
    tifffile.imwrite(folder / "tiff" / "a.tif", np.zeros((120, 8, 8), np.uint16))
    np.savez(folder / "tiff" / "a.npz", rois=np.ones((2, 8, 8), bool))
    tifffile.imwrite(folder / "tiff" / "b.tif", np.zeros((120, 8, 8), np.uint16))
    movies = load_judge_movies(folder, max_movies=8, min_frames=100, fallback_rate_hz=30.0)
    assert [m.name for m in movies] == ["a", "b"] and movies[0].truth.shape == (2, 8, 8) and movies[1].truth is None
    assert len(load_judge_movies(folder / "tiff", max_movies=1, min_frames=100, fallback_rate_hz=30.0)) == 1
    with pytest.raises(DataError, match="frames, expected >= 200"):
        load_judge_movies(folder, max_movies=8, min_frames=200, fallback_rate_hz=30.0)
    np.savez(folder / "tiff" / "b.npz", rois=np.ones((2, 9, 9), bool))
    with pytest.raises(DataError, match=r"b.npz: 'rois' has shape \(2, 9, 9\), expected \[N, 8, 8\]"):
        load_judge_movies(folder, max_movies=8, min_frames=100, fallback_rate_hz=30.0)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text(json.dumps({}))
    with pytest.raises(DataError, match="shard folder of short clips; suite2p needs whole movies"):
        load_judge_movies(shards, 8, 100)
    with pytest.raises(DataError, match="does not exist"):
        load_judge_movies(tmp_path / "nope", 8, 100)


@pytest.mark.parametrize("override, match", [
    ("judge=cellpose", "judge"),
    ("suite2p.spatial_scale=0", "suite2p.spatial_scale"),
    ("suite2p.iou=1.5", "suite2p.iou"),
    ("suite2p.min_frames=5", "suite2p.min_frames"),
    ("suite2p.treshold_scaling=2", "treshold_scaling"),
])
def test_judge_config_is_validated_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        compose("evaluate", [override])
    cfg = compose("evaluate", ["judge=suite2p", "suite2p.tau=0.7"])
    assert cfg.judge == "suite2p" and Suite2pJudgeConfig(**dict(cfg.suite2p)).tau == 0.7


def test_roi_contrast_is_positive_where_activity_sits_in_the_requested_cells():
    from cadiff.eval.rois import roi_contrast

    rng = np.random.default_rng(0)
    movie = rng.normal(0, 1, (200, 16, 16)).astype(np.float32)
    cell = _square(16, 16, 4, 4, size=5)
    movie[:, cell] += 3 * rng.normal(0, 1, (200, 1))  # one shared trace across the cell's pixels
    here = roi_contrast(movie, cell[None])
    elsewhere = roi_contrast(movie, _square(16, 16, 10, 10, size=5)[None])
    assert here["contrast"] > 0.5 and here["corr_inside"] > here["corr_outside"]
    assert elsewhere["contrast"] < 0
