"""Photon-transfer calibration and the generalized Anscombe transform."""

from __future__ import annotations

import numpy as np
import pytest

from cadiff.data.anscombe import anscombe, inverse_anscombe
from cadiff.data.noise import estimate_dark_calibration, estimate_photon_transfer, estimate_raw_scale
from cadiff.data.simulate import simulate_movie
from cadiff.errors import DataError, NoPhotonSignature
from cadiff.testing.data import log_scaled_movie


def _naive_gain(movie: np.ndarray) -> float:
    x = movie.astype(np.float64)
    diff = np.diff(x, axis=0)
    return float(np.polyfit(((x[1:] + x[:-1]) / 2).ravel(), (diff**2 / 2).ravel(), 1)[0])


@pytest.mark.parametrize("gain", [1.0, 2.0, 4.5, 8.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_gain_and_intercept_on_default_sim(gain, seed):
    movie, truth = simulate_movie(frames=200, height=64, width=64, seed=seed, gain=gain)
    pt = estimate_photon_transfer(movie.data)
    assert pt.method == "binned"
    assert pt.gain == pytest.approx(gain, rel=0.05)
    assert pt.offset == pytest.approx(truth.intercept, abs=3.0)
    assert pt.r2 > 0.95 and len(pt.means) == len(pt.variances) > 10


def test_robust_where_plain_differences_fail():
    movie, truth = simulate_movie(frames=200, height=64, width=64, seed=5, dff_per_spike=3.0, neuron_photons=60.0)
    assert _naive_gain(movie.data) > 2.0 * truth.gain  # calcium transients inflate frame differences
    assert estimate_photon_transfer(movie.data).gain == pytest.approx(truth.gain, rel=0.05)


def test_photon_starved_two_photon_sim_uses_dark_level():
    movie, truth = simulate_movie(preset="two_photon", frames=200, height=64, width=64, seed=0)
    pt = estimate_photon_transfer(movie.data)
    assert pt.method == "dark"
    assert pt.gain == pytest.approx(truth.gain, rel=0.1)
    assert pt.offset == pytest.approx(truth.intercept, abs=5.0)
    assert pt.read_noise == pytest.approx(truth.read_noise, rel=0.15)


def test_real_allen_sample_gain_in_expected_range(real_data_dir):
    from cadiff.data.sources.allen import read_allen

    movie = read_allen(real_data_dir / "792757260_test_data.h5", key="input_frames")
    pt = estimate_photon_transfer(movie.data)
    # README: "a very rough fit ... about 600 units per unit of mean above a level of about 200"
    assert 350 < pt.gain < 700 and 170 < pt.offset < 200


def test_anscombe_inverse_and_variance_stabilization():
    y = np.linspace(0.0, 500.0, 101)
    for sigma in (0.0, 1.7):
        np.testing.assert_allclose(inverse_anscombe(anscombe(y, sigma), sigma), y, rtol=1e-10, atol=1e-9)
    rng = np.random.default_rng(0)
    for lam in (5.0, 30.0, 200.0):
        sample = rng.poisson(lam, 200_000) + rng.normal(0, 1.5, 200_000)
        assert np.var(anscombe(sample, 1.5)) == pytest.approx(1.0, abs=0.06)


def test_too_short_movie_is_a_data_error():
    from cadiff.errors import DataError

    with pytest.raises(DataError, match="frames"):
        estimate_photon_transfer(np.zeros((3, 16, 16), np.uint16))


def test_constant_movie_raises_data_error_not_value_error():
    from cadiff.errors import DataError

    with pytest.raises(DataError, match="not positive"):
        estimate_photon_transfer(np.full((40, 32, 32), 100, np.uint16))


# ---------------------------------------------------------------------------------------------------------
# dark-pixel offset and raw units (prepare_data source.calibration=dark | none)


def test_no_photon_signature_is_its_own_error_but_bad_input_is_not():
    with pytest.raises(NoPhotonSignature, match="not positive"):
        estimate_photon_transfer(log_scaled_movie())
    with pytest.raises(NoPhotonSignature, match=">= 8 frames"):
        estimate_photon_transfer(np.zeros((5, 16, 16), np.uint16))
    bad = simulate_movie(frames=16, height=16, width=16, seed=0)[0].data.astype(np.float32)
    bad[3, 2, 2] = np.nan
    with pytest.raises(DataError, match="NaN") as info:
        estimate_photon_transfer(bad)
    assert not isinstance(info.value, NoPhotonSignature)  # prepare's auto must not fall back on bad input


def test_dark_calibration_takes_the_offset_from_the_darkest_pixels():
    # photon-starved two-photon data: most pixels sit at the dark level, so the 1st percentile of the mean image is it
    movie, truth = simulate_movie(preset="two_photon", frames=64, height=48, width=48, seed=0)
    pt = estimate_dark_calibration(movie.data)
    assert pt.method == "dark_pixels" and pt.offset == pytest.approx(truth.offset, abs=5.0)
    assert pt.gain == pytest.approx(truth.gain, rel=0.15) and pt.r2 > 0.9
    # with the offset given only the slope is fitted: exact on the default simulator
    movie, truth = simulate_movie(frames=64, height=48, width=48, seed=1)
    fixed = estimate_dark_calibration(movie.data, offset=truth.intercept)
    assert fixed.offset == truth.intercept and fixed.gain == pytest.approx(truth.gain, rel=0.03)


def test_dark_calibration_refuses_data_whose_variance_does_not_grow():
    with pytest.raises(NoPhotonSignature, match=r"variance does not grow with the level.*R\^2"):
        estimate_dark_calibration(log_scaled_movie())


def test_raw_scale_is_robust_and_works_on_five_frames():
    rng = np.random.default_rng(0)
    x = rng.normal(100.0, 5.0, (40, 32, 32))
    x[rng.random(x.shape) < 0.02] += 200.0  # sparse transients move neither the median nor the MAD much
    raw = estimate_raw_scale(x)
    assert raw.center == pytest.approx(100.0, abs=0.5) and raw.scale == pytest.approx(5.0, rel=0.05)
    assert raw.noise_std == pytest.approx(5.0, rel=0.1) and raw.num_frames == 40
    assert raw.low == x.min() and raw.high == x.max()
    short = estimate_raw_scale(x[:5].astype(">f4"))  # big-endian, shorter than a photon-transfer window
    assert short.num_frames == 5 and short.scale == pytest.approx(5.0, rel=0.1)
    # a temporally smoothed movie reports the (smaller) noise it still has
    smooth = estimate_raw_scale((x[:-1] + x[1:]) / 2)
    assert smooth.noise_std < 0.8 * raw.noise_std


def test_raw_scale_of_a_constant_or_nonfinite_movie_is_a_data_error():
    with pytest.raises(DataError, match="every sampled value is 7"):
        estimate_raw_scale(np.full((5, 8, 8), 7.0, np.float32))
    bad = np.ones((5, 8, 8), np.float32)
    bad[4, 0, 0] = np.inf
    with pytest.raises(DataError, match="NaN/Inf"):
        estimate_raw_scale(bad)
