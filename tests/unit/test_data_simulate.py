"""Simulator: determinism, ground-truth consistency and detector statistics (variance-vs-mean slope = gain)."""

from __future__ import annotations

import numpy as np
import pytest

from cadiff.data.simulate import PRESETS, calcium_kernel, simulate_movie
from cadiff.errors import ConfigError


def test_deterministic_by_seed_and_shapes():
    a, ta = simulate_movie(frames=40, height=24, width=20, seed=3)
    b, tb = simulate_movie(frames=40, height=24, width=20, seed=3)
    c, _ = simulate_movie(frames=40, height=24, width=20, seed=4)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)
    n = ta.spikes.shape[0]
    assert a.data.shape == (40, 24, 20) and a.data.dtype == np.uint16
    assert ta.traces.shape == (n, 40) and ta.footprints.shape == (n, 24, 20) and ta.rois.dtype == bool
    assert ta.clean.shape == (40, 24, 20) and ta.clean.dtype == np.float32
    assert a.rois is ta.rois and a.gain == ta.gain == PRESETS["default"]["gain"]


def test_traces_are_spikes_convolved_with_kernel(sim_movie):
    movie, truth = sim_movie
    kernel = calcium_kernel(movie.rate_hz, PRESETS["default"]["tau_rise_s"], PRESETS["default"]["tau_decay_s"])
    assert kernel.max() == pytest.approx(1.0)
    for spikes, trace in zip(truth.spikes, truth.traces):
        np.testing.assert_allclose(trace, np.convolve(spikes, kernel)[: len(trace)], rtol=1e-5, atol=1e-6)
    assert truth.spikes.sum() > 0


def test_variance_vs_mean_slope_equals_gain():
    for gain in (1.5, 6.0):
        movie, truth = simulate_movie(frames=120, height=48, width=48, seed=1, gain=gain, read_noise=3.0)
        expected = truth.offset + gain * truth.clean  # mean ADU of every pixel-frame
        resid2 = (movie.data.astype(np.float64) - expected) ** 2  # its variance: gain^2 clean + read_noise^2
        slope, intercept = np.polyfit(expected.ravel(), resid2.ravel(), 1)
        assert slope == pytest.approx(gain, rel=0.03)
        assert -intercept / slope == pytest.approx(truth.intercept, abs=2.0)


def test_two_photon_preset_is_photon_starved():
    movie, truth = simulate_movie(preset="two_photon", frames=60, height=48, width=48, seed=0)
    assert movie.rate_hz == 30.0
    assert float(truth.clean.mean()) < 1.0  # under one photon per pixel per frame
    values = movie.data.astype(np.float64)
    assert abs(np.median(values) - truth.offset) < 10  # the dark level dominates
    assert np.percentile(values, 99) > truth.offset + truth.gain  # single-photon events stand out


def test_motion_shifts_and_unknown_overrides():
    _, truth = simulate_movie(frames=30, height=16, width=16, seed=0, motion_px=2)
    assert np.abs(truth.shifts).max() <= 2 and np.abs(truth.shifts).max() > 0
    with pytest.raises(ConfigError, match="not_a_key"):
        simulate_movie(frames=5, height=8, width=8, not_a_key=1.0)
    with pytest.raises(ConfigError, match="preset"):
        simulate_movie(preset="confocal")
