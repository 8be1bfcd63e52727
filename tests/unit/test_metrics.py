"""Weights-free evaluation metrics on known cases: i.i.d. noise, AR(1) processes and simulated movies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sstats

from cadiff.data.simulate import simulate_movie
from cadiff.errors import DataError
from cadiff.eval import metrics as M

CLIP = 17


def photons(preset: str = "default", frames: int = 68, size: int = 32, seed: int = 0, **overrides):
    """A simulated movie in photon units (its own calibration) and its ground truth."""
    movie, truth = simulate_movie(preset, frames=frames, height=size, width=size, seed=seed, **overrides)
    return (movie.data.astype(np.float64) - truth.offset) / truth.gain, truth


def clips_of(movie: np.ndarray, frames: int = CLIP) -> list[np.ndarray]:
    return [movie[t : t + frames] for t in range(0, movie.shape[0] - frames + 1, frames)]


def sim_clips(seeds, **kw) -> list[np.ndarray]:
    return [c for s in seeds for c in clips_of(photons(seed=s, **kw)[0])]


# ---------------------------------------------------------------------------------------------------------
# noise: photon transfer


def test_gain_of_simulated_movie_recovered_in_adu_and_photon_units():
    for gain in (2.0, 6.0):
        movie, truth = simulate_movie("default", frames=68, height=32, width=32, seed=3, gain=gain)
        pt = M.photon_transfer(movie.data)
        assert pt["gain"] == pytest.approx(gain, rel=0.1)
        assert pt["offset"] == pytest.approx(truth.intercept, abs=3 * gain)
        assert pt["means"].shape == pt["variances"].shape and pt["means"].size >= 3
        # in photon units a shot-noise-limited clip has gain 1, clip by clip
        ph = (movie.data.astype(np.float64) - truth.offset) / truth.gain
        gains = [M.clip_stats(c).gain for c in clips_of(ph)]
        assert np.median(gains) == pytest.approx(1.0, rel=0.1)


def test_gain_ratio_detects_wrong_noise_level_and_smoothing():
    ref = sim_clips([0, 1])
    same = sim_clips([2, 3])
    # a "generator" in the reference's units but with 3x the detector gain: 3x the variance per photon
    movie, truth = simulate_movie("default", frames=68, height=32, width=32, seed=4, gain=6.0, offset=100.0)
    noisy = clips_of((movie.data.astype(np.float64) - 100.0) / 2.0)
    # a "regression autoencoder" output: the same scenes with shot noise averaged away over 3 frames
    kernel = np.ones(3) / 3
    smooth = [np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), 0, c) for c in same]
    r_same = M.evaluate_sets(same, ref)["noise"]["gain_ratio"]
    r_noisy = M.evaluate_sets(noisy, ref)["noise"]["gain_ratio"]
    r_smooth = M.evaluate_sets(smooth, ref)["noise"]["gain_ratio"]
    assert 0.9 <= r_same <= 1.1
    assert r_noisy == pytest.approx(3.0, rel=0.15)
    assert r_smooth < 0.7


def test_photon_transfer_of_constant_clip_is_nan_not_an_error():
    stats = M.clip_stats(np.full((CLIP, 16, 16), 5.0))
    assert math.isnan(stats.gain) and math.isnan(stats.offset)
    assert stats.std == 0 and stats.skewness == 0 and stats.kurtosis == 0
    assert np.all(stats.corr_image == 0)
    feats = M.clip_features(stats)
    assert math.isnan(feats["log_gain"])


# ---------------------------------------------------------------------------------------------------------
# intensity


def test_pixel_moments_match_scipy():
    rng = np.random.default_rng(0)
    clip = rng.gamma(2.0, 3.0, size=(20, 8, 8))
    mean, std, skewness, kurtosis = M.pixel_moments(clip)
    assert mean == pytest.approx(clip.mean())
    assert std == pytest.approx(clip.std())
    assert skewness == pytest.approx(sstats.skew(clip.ravel()))
    assert kurtosis == pytest.approx(sstats.kurtosis(clip.ravel()))


def test_wasserstein1_exact_cases():
    rng = np.random.default_rng(1)
    a = rng.normal(size=500)
    assert M.wasserstein1(a, a + 2.5) == pytest.approx(2.5)
    assert M.wasserstein1(a, a) == 0.0
    b = rng.exponential(size=333)
    assert M.wasserstein1(a, b) == pytest.approx(sstats.wasserstein_distance(a, b))
    with pytest.raises(DataError):
        M.wasserstein1(a, np.zeros(0))


# ---------------------------------------------------------------------------------------------------------
# temporal


def ar1(phi: float, shape=(400, 8, 8), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=shape)
    x = np.empty(shape)
    x[0] = e[0] / math.sqrt(1 - phi**2)
    for t in range(1, shape[0]):
        x[t] = phi * x[t - 1] + e[t]
    return x


def test_autocorrelation_of_ar1_and_white_noise():
    acf = M.autocorrelation(ar1(0.8), 5)
    assert acf.shape == (5,)
    np.testing.assert_allclose(acf, 0.8 ** np.arange(1, 6), atol=0.05)
    white = M.autocorrelation(np.random.default_rng(2).normal(size=(400, 8, 8)), 3)
    np.testing.assert_allclose(white, 0.0, atol=0.02)
    assert M.autocorrelation(np.zeros((6, 4, 4)) + np.arange(6)[:, None, None], 10).shape == (5,)  # clamped to T-1


def test_temporal_psd_white_is_flat_at_the_variance_and_ar1_is_lowpass():
    rng = np.random.default_rng(3)
    freqs, psd = M.temporal_psd(rng.normal(0, 2.0, size=(64, 16, 16)))
    assert freqs[0] > 0 and freqs[-1] == pytest.approx(0.5)
    assert psd.mean() == pytest.approx(4.0, rel=0.1)  # Parseval: one-sided bins of a white process carry sigma^2
    _, red = M.temporal_psd(ar1(0.9, shape=(64, 16, 16)))
    assert red[:4].mean() > 10 * red[-4:].mean()
    assert M.log_psd_distance_db(psd, psd) == 0.0
    assert M.log_psd_distance_db(10 * psd, psd) == pytest.approx(10.0)


# ---------------------------------------------------------------------------------------------------------
# spatial


def test_correlation_image_of_iid_noise_is_near_zero():
    clip = np.random.default_rng(4).poisson(20.0, size=(200, 32, 32)).astype(np.float64)
    corr = M.local_correlation_image(clip)
    assert corr.shape == (32, 32)
    assert abs(np.median(corr)) < 0.02
    assert np.percentile(corr, 99) < 0.15


def test_correlation_image_matches_pearson_with_neighbours():
    clip = np.random.default_rng(5).normal(size=(30, 5, 6))
    corr = M.local_correlation_image(clip)
    for y, x in ((0, 0), (2, 3), (4, 5), (0, 3)):
        rs = [
            np.corrcoef(clip[:, y, x], clip[:, y + dy, x + dx])[0, 1]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dy or dx) and 0 <= y + dy < 5 and 0 <= x + dx < 6
        ]
        assert corr[y, x] == pytest.approx(np.mean(rs))


def test_correlation_image_of_simulated_movie_is_high_inside_rois():
    ph, truth = photons(frames=200, seed=1)
    corr = M.local_correlation_image(ph)
    inside = truth.rois.any(axis=0)
    assert inside.any() and (~inside).any()
    assert np.median(corr[inside]) > 0.3
    assert np.median(corr[inside]) > 4 * max(np.median(corr[~inside]), 0.02)


def test_spatial_power_spectrum_white_flat_and_smooth_lowpass():
    rng = np.random.default_rng(6)
    freqs, psd = M.spatial_power_spectrum(rng.normal(0, 3.0, size=(8, 32, 32)))
    assert freqs.shape == psd.shape == (16,)
    assert freqs[-1] == pytest.approx(0.5)
    assert psd.mean() == pytest.approx(9.0, rel=0.1)
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(rng.normal(size=(8, 32, 32)), sigma=(0, 3, 3))
    _, spsd = M.spatial_power_spectrum(smooth)
    assert spsd[:3].mean() > 100 * spsd[-3:].mean()


# ---------------------------------------------------------------------------------------------------------
# set level


def test_mmd_unbiased_near_zero_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    z = rng.normal(1.5, 1.0, size=(40, 3))
    sigma = M.median_bandwidth(np.concatenate([x, y]))
    assert sigma == pytest.approx(math.sqrt(2 * 3), rel=0.25)  # median distance of N(0, I_3) pairs
    same = M.mmd2_unbiased(x, y, sigma)
    diff = M.mmd2_unbiased(x, z, sigma)
    assert abs(same) < 0.05 < diff
    base = M.split_half_mmd2(x, sigma, np.random.default_rng(0), splits=8)
    assert base.shape == (8,) and abs(base.mean()) < 0.05
    with pytest.raises(DataError):
        M.mmd2_unbiased(x[:1], y, sigma)


def test_split_half_by_recording_sees_what_a_split_of_clips_hides():
    # 6 "recordings" of 20 clips each, every recording with its own offset: clips of one recording are alike
    rng = np.random.default_rng(5)
    offsets = rng.normal(scale=1.0, size=(6, 1, 3))
    ref = (offsets + 0.3 * rng.normal(size=(6, 20, 3))).reshape(120, 3)
    groups = np.repeat([f"movie{i}" for i in range(6)], 20)
    sigma = M.median_bandwidth(ref)
    by_clip = M.split_half_mmd2(ref, sigma, np.random.default_rng(0))
    by_recording = M.split_half_mmd2(ref, sigma, np.random.default_rng(0), groups=groups)
    assert abs(by_clip.mean()) < 0.02 and by_recording.mean() > 10 * max(abs(by_clip.mean()), 0.01)
    assert len(by_recording) == 10  # every distinct 3-vs-3 split of 6 recordings (C(6, 3) / 2), none twice
    # a new set of recordings scores at the recording split's level, far above the clip split's
    new = (rng.normal(size=(6, 1, 3)) + 0.3 * rng.normal(size=(6, 20, 3))).reshape(120, 3)
    report = M.mmd_report(new, ref, groups=groups)
    assert report["baseline_unit"] == "recording" and report["baseline_recordings"] == 6
    assert report["mmd2"] > 10 * abs(M.mmd_report(new, ref)["baseline_mmd2"])
    assert M.mmd_report(new, ref)["baseline_unit"] == "clip"
    with pytest.raises(DataError, match="at least 2 recordings"):
        M.split_half_mmd2(ref, sigma, np.random.default_rng(0), groups=["one"] * 120)
    with pytest.raises(DataError, match="one per clip"):
        M.split_half_mmd2(ref, sigma, np.random.default_rng(0), groups=groups[:10])
    # one recording: the clip split, said so
    assert M.mmd_report(new, ref, groups=["one"] * 120)["baseline_unit"] == "clip"


def test_group_halves_are_distinct_and_each_split_counted_once():
    rng = np.random.default_rng(0)
    halves = M._group_halves(8, 16, rng)  # C(8, 4) / 2 = 35 splits: 16 of them
    assert len(halves) == len(set(halves)) == 16 and all(len(h) == 4 and 0 in h for h in halves)
    assert M._group_halves(4, 16, rng) == [(0, 1), (0, 2), (0, 3)]
    odd = M._group_halves(5, 16, rng)  # halves of 2 of 5: 10 distinct, no complement to fold
    assert len(odd) == len(set(odd)) == 10
    many = M._group_halves(40, 16, rng)
    assert len(set(many)) == 16 and all(0 in h and len(h) == 20 for h in many)


def test_compare_sets_splits_the_reference_by_recording_unless_told_clip():
    ref = M.summarize_set(sim_clips([0, 1]), groups=["a"] * 4 + ["b"] * 4)
    gen = M.summarize_set(sim_clips([2]))
    assert M.compare_sets(gen, ref)["mmd"]["baseline_unit"] == "recording"
    assert M.compare_sets(gen, ref, baseline="clip")["mmd"]["baseline_unit"] == "clip"
    with pytest.raises(DataError, match="baseline 'movie'"):
        M.compare_sets(gen, ref, baseline="movie")
    with pytest.raises(DataError, match="recording labels for 8 clips"):
        M.summarize_set(sim_clips([0, 1]), groups=["a"])


def test_feature_shift_names_the_feature_that_moved_in_reference_standard_deviations():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(400, 3))
    gen = rng.normal(size=(400, 3)) + np.array([0.0, 2.0, 0.0])
    gen[:10, 2] = np.nan  # failed fits are left out, not counted as 0
    ref[:, 0] = 1.0  # a constant reference feature has no scale: None
    shift = M.feature_shift(gen, ref, ["const", "moved", "still"])
    assert shift["const"] is None
    assert shift["moved"] == pytest.approx(2.0, abs=0.2) and abs(shift["still"]) < 0.2


def test_mmd_of_same_simulator_config_below_different_config():
    # one clip per simulated field of view: clips of one movie share cells and neuropil, so are not independent
    def fovs(seeds, **overrides):
        return [photons(frames=CLIP, seed=s, **overrides)[0] for s in seeds]

    ref = fovs(range(16))
    same = fovs(range(16, 32))
    # a different config: dimmer neuropil, brighter and faster cells
    other = fovs(range(16, 32), background_photons=8.0, neuron_photons=60.0, tau_decay_s=0.2)
    m_same = M.evaluate_sets(same, ref, seed=0)["mmd"]
    m_other = M.evaluate_sets(other, ref, seed=0)["mmd"]
    # the feature that moved most is a temporal-spectrum band (brighter, faster cells: more power at every
    # temporal frequency; measured +2.8 sd), and the shifts of the same config stay small
    shift = {k: v for k, v in m_other["feature_shift"].items() if v is not None}
    assert max(shift, key=lambda k: abs(shift[k])).startswith("log_tpsd_band") and max(map(abs, shift.values())) > 2
    assert max(abs(v) for v in m_same["feature_shift"].values() if v is not None) < 1.5, m_same["feature_shift"]
    assert m_same["num_gen"] == m_same["num_ref"] == 16
    assert m_same["mmd2"] < m_other["mmd2"]
    # the baseline makes the number interpretable: the same config sits at the split-half noise level
    assert m_same["mmd2"] < m_same["baseline_mmd2"] + 2 * m_same["baseline_mmd2_std"]
    assert m_other["mmd2"] > m_other["baseline_mmd2"] + 2 * m_other["baseline_mmd2_std"]


def test_evaluate_sets_is_complete_strict_json_and_deterministic():
    ref = sim_clips([0, 1])
    gen = sim_clips([2])
    out = M.evaluate_sets(gen, ref, acf_lags=4, rate_hz=10.0, seed=1)
    assert out == M.evaluate_sets(gen, ref, acf_lags=4, rate_hz=10.0, seed=1)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out
    assert out["clip_shape"] == [CLIP, 32, 32]
    assert len(out["temporal"]["acf_gen"]) == 4 and out["temporal"]["acf_lags"] == [1, 2, 3, 4]
    assert out["temporal"]["freqs_hz"][-1] == pytest.approx(10.0 * out["temporal"]["freqs_cycles_per_frame"][-1])
    assert len(out["mmd"]["feature_names"]) == 6 + 2 + 2 + 2 * M.NUM_FEATURE_BANDS
    assert out["mmd"]["baseline_mmd2"] is not None  # 8 reference clips
    for section, key in (("noise", "gain_ratio"), ("intensity", "w1"), ("spatial", "corr_p99_gen"), ("mmd", "mmd2")):
        assert isinstance(out[section][key], float)


def test_small_sets_and_bad_shapes():
    rng = np.random.default_rng(8)
    one = [rng.poisson(10.0, size=(CLIP, 16, 16)).astype(float)]
    out = M.evaluate_sets(one, one * 3)
    assert out["mmd"]["mmd2"] is None and out["mmd"]["baseline_mmd2"] is None
    with pytest.raises(DataError, match="common shape"):
        M.summarize_set([one[0], one[0][:, :8]])
    with pytest.raises(DataError, match="expected"):
        M.evaluate_sets(one, [one[0][:, :8, :8]])
    with pytest.raises(DataError, match=r"\[T>="):
        M.clip_stats(np.zeros((2, 16, 16)))
    with pytest.raises(DataError, match="NaN"):
        M.clip_stats(np.full((CLIP, 8, 8), np.nan))
    with pytest.raises(DataError, match="no clips"):
        M.summarize_set([])


def test_raw_unit_sets_report_photon_transfer_as_not_applicable():
    rng = np.random.default_rng(9)
    ref = [rng.normal(3.0, 0.5, size=(CLIP, 16, 16)) for _ in range(4)]  # e.g. log-scaled, no photon scale
    gen = [rng.normal(3.1, 0.5, size=(CLIP, 16, 16)) for _ in range(2)]
    out = M.evaluate_sets(gen, ref, acf_lags=4, units="raw")
    assert out["units"] == "raw" and "source.calibration=none" in out["noise"]["not_applicable"]
    assert all(out["noise"][k] is None for k in M.NOISE_KEYS)
    assert not {"log_gain", "offset"} & set(out["mmd"]["feature_names"])
    assert len(out["mmd"]["feature_names"]) == 4 + 2 + 2 + 2 * M.NUM_FEATURE_BANDS
    assert out["intensity"]["mean_gen"] == pytest.approx(3.1, abs=0.05) and isinstance(out["intensity"]["w1"], float)
    photon_set = M.summarize_set([np.abs(c) for c in ref], units="photons")
    with pytest.raises(DataError, match="generated clips in raw units, reference clips in photons"):
        M.compare_sets(M.summarize_set(gen, units="raw"), photon_set)
    with pytest.raises(DataError, match="units 'adu'"):
        M.summarize_set(gen, units="adu")
