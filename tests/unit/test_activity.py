"""cadiff.eval.activity: dF/F, event detection and event rates on synthetic traces with known events."""

import numpy as np
import pytest

from cadiff.errors import DataError
from cadiff.eval.activity import activity_stats, compare_activity, delta_f_over_f, detect_events, roi_traces

RATE_HZ = 30.0
ONSETS = [40, 120, 200, 260]
PEAKS = [0.8, 1.5, 0.6, 1.0]


def known_dff(frames: int = 300, noise: float = 0.03, seed: int = 0) -> np.ndarray:
    """dF/F with decaying transients (tau 0.4 s) of height PEAKS at ONSETS plus Gaussian noise."""
    t = np.arange(frames)
    clean = np.zeros(frames)
    for onset, peak in zip(ONSETS, PEAKS):
        clean += np.where(t >= onset, peak * np.exp(-(t - onset) / (0.4 * RATE_HZ)), 0.0)
    return clean + np.random.default_rng(seed).normal(0.0, noise, frames)


def test_detect_events_finds_known_onsets_and_peaks():
    onsets, peaks = detect_events(known_dff())
    assert list(onsets) == ONSETS
    np.testing.assert_allclose(peaks, PEAKS, atol=0.1)


def test_detect_events_on_pure_noise_finds_almost_none():
    onsets, _ = detect_events(np.random.default_rng(1).normal(0.0, 0.05, 3000))
    assert len(onsets) <= 10  # P(z > 3) = 0.00135: ~4 noise events in 3000 frames, against 4 in 300 above


def test_delta_f_over_f_recovers_relative_change_and_flags_dark_traces():
    f0 = 12.0
    traces = np.stack([f0 * (1.0 + np.r_[np.zeros(80), np.full(20, 0.5)]), np.zeros(100)])
    dff = delta_f_over_f(traces)
    np.testing.assert_allclose(dff[0], np.r_[np.zeros(80), np.full(20, 0.5)])
    assert np.isnan(dff[1]).all()


def test_activity_stats_on_a_movie_with_known_rois():
    frames, side = 300, 8
    rois = np.zeros((3, side, side), dtype=bool)
    rois[0, :4, :4] = rois[1, 4:, 4:] = True  # roi 2 is empty and must be left out
    movie = np.full((frames, side, side), 5.0)
    movie[:, :4, :4] *= 1.0 + np.clip(known_dff(frames, noise=0.0), 0, None)[:, None, None]
    movie += np.random.default_rng(2).normal(0.0, 0.1, movie.shape)
    assert roi_traces(movie, rois).shape == (2, frames)
    stats = activity_stats(movie, rois, RATE_HZ)
    np.testing.assert_allclose(stats["event_rate_hz"][0], len(ONSETS) * RATE_HZ / frames)
    assert stats["event_rate_hz"][1] <= RATE_HZ / frames  # the silent ROI: at most one noise crossing
    assert len(stats["amplitude_dff"]) >= len(ONSETS)
    cmp = compare_activity(stats, stats)
    assert cmp["event_rate_hz"]["w1"] == 0.0 and cmp["amplitude_dff"]["n_gen"] == len(stats["amplitude_dff"])


def test_no_rois_give_empty_statistics():
    stats = activity_stats(np.ones((20, 4, 4)), np.zeros((0, 4, 4), bool), RATE_HZ)
    assert stats["event_rate_hz"].size == 0 and stats["amplitude_dff"].size == 0
    assert compare_activity(stats, stats)["event_rate_hz"] == {"median_gen": None, "median_ref": None, "n_gen": 0,
                                                               "n_ref": 0, "w1": None}


def test_bad_shapes_and_rates_raise_one_line_errors():
    with pytest.raises(DataError, match=r"movie \(10, 4, 4\) and ROIs \(1, 5, 5\)"):
        roi_traces(np.zeros((10, 4, 4)), np.ones((1, 5, 5), bool))
    with pytest.raises(DataError, match="rate_hz = 0"):
        activity_stats(np.zeros((10, 4, 4)), np.ones((1, 4, 4), bool), 0.0)
