"""Synthetic Poisson-Gaussian calcium-imaging movies with ground truth (spikes, traces, footprints).

Scene: ``N`` neurons with elliptic Gaussian footprints on a spatially smooth neuropil background. Spikes are
Poisson counts per frame; calcium traces are spikes convolved with a difference-of-exponentials kernel
(rise/decay time constants), and each neuron's flux is ``F0 * (1 + dff_per_spike * trace)``. The background
carries a slow multiplicative drift and slow neuropil fluctuations; optional rigid integer motion shifts the
whole field of view per frame.

Detector: ``photons ~ Poisson(clean)``, ``ADU = offset + gain * photons + N(0, read_noise^2)``, rounded and
clipped to uint16. The photon-transfer line is therefore ``var = gain * (mean - offset) + read_noise^2``
with x-intercept ``offset - read_noise^2 / gain``.

Presets
- ``default``: a bright teaching movie at 10 Hz (rise 0.07 s, decay 0.7 s, GCaMP6s-like; Chen et al. 2013,
  Nature 499:295), tens of photons per pixel per frame, gain 2 ADU/photon.
- ``two_photon``: photon-starved raw two-photon data at ~30 Hz with GCaMP6f kinetics (rise ~0.05 s, decay
  ~0.4 s; Chen et al. 2013). Calibrated against the raw Allen Brain Observatory sample
  ``shared/data/real/792757260_test_data.h5`` (``input_frames``, 100x100x100 int16), measured with
  :func:`cadiff.data.noise.estimate_photon_transfer` (dark-level method): dark level (histogram mode) 186 ADU,
  read noise about 11 ADU (RMS of the values below the mode), photon-transfer slope about 490 ADU per
  photon-equivalent (intercept ~185 ADU, r2 0.91 over 32 bins), mean 264 ADU, i.e. about 0.16 photons per
  pixel per frame; 1st/50th/99th percentiles 157/189/1130 ADU. The preset (gain 500, offset 186, read noise
  11, background 0.1 and resting neurons 0.3 photons) reproduces about 161/188/1180 ADU with a mean near 270 (64x64..100x100 fields).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from cadiff.data.movie import UINT16_MAX, Movie
from cadiff.errors import ConfigError

PRESETS: dict[str, dict[str, float]] = {
    "default": {
        "rate_hz": 10.0,
        "gain": 2.0,  # ADU per photon
        "offset": 100.0,  # ADU
        "read_noise": 2.0,  # ADU
        "background_photons": 20.0,  # mean neuropil flux per pixel per frame
        "background_contrast": 0.3,  # relative spatial variation of the neuropil
        "neuron_photons": 30.0,  # resting flux at the footprint peak
        "dff_per_spike": 2.0,  # dF/F of one spike at the trace peak
        "spike_rate_hz": 1.0,
        "tau_rise_s": 0.07,
        "tau_decay_s": 0.7,
        "neuron_sigma_px": 2.5,  # footprint Gaussian sigma (minor axis)
        "neuron_ellipticity": 0.4,  # major sigma = minor sigma * (1 + U(0, ellipticity))
        "neurons_per_kpx": 4.0,  # default neuron count per 1000 pixels
        "drift": 0.05,  # amplitude of the slow multiplicative baseline drift
        "drift_period_s": 120.0,
        "neuropil_fluctuation": 0.03,  # std of the slow neuropil modulation
        "neuropil_tau_s": 5.0,
        "motion_px": 0.0,  # max rigid integer shift per frame (0: no motion)
    },
    "two_photon": {
        "rate_hz": 30.0,
        "gain": 500.0,
        "offset": 186.0,
        "read_noise": 11.0,
        "background_photons": 0.1,
        "background_contrast": 0.3,
        "neuron_photons": 0.3,
        "dff_per_spike": 0.6,
        "spike_rate_hz": 0.3,
        "tau_rise_s": 0.05,
        "tau_decay_s": 0.4,
        "neuron_sigma_px": 3.0,
        "neuron_ellipticity": 0.4,
        "neurons_per_kpx": 3.0,
        "drift": 0.05,
        "drift_period_s": 120.0,
        "neuropil_fluctuation": 0.03,
        "neuropil_tau_s": 5.0,
        "motion_px": 0.0,
    },
}


@dataclass
class GroundTruth:
    """What the simulator knows: spikes/traces ``[N, T]``, footprints ``[N, H, W]``, detector calibration."""

    spikes: np.ndarray  # [N, T] int spike counts per frame
    traces: np.ndarray  # [N, T] float32 calcium (1 spike -> peak 1)
    footprints: np.ndarray  # [N, H, W] float32, peak 1
    rois: np.ndarray  # [N, H, W] bool
    gain: float
    offset: float
    read_noise: float
    clean: np.ndarray | None = None  # [T, H, W] float32 expected photon flux
    background: np.ndarray | None = None  # [H, W] float32 resting neuropil flux
    shifts: np.ndarray | None = None  # [T, 2] int rigid motion (dy, dx)

    @property
    def intercept(self) -> float:
        """Photon-transfer x-intercept ``offset - read_noise^2 / gain`` (what the estimator recovers)."""
        return self.offset - self.read_noise**2 / self.gain


def calcium_kernel(rate_hz: float, tau_rise_s: float, tau_decay_s: float) -> np.ndarray:
    """Difference-of-exponentials kernel sampled at frame centres, peak normalized to 1."""
    length = max(2, int(math.ceil(8 * tau_decay_s * rate_hz)))
    t = (np.arange(length) + 0.5) / rate_hz
    h = np.exp(-t / tau_decay_s) - np.exp(-t / tau_rise_s)
    return (h / h.max()).astype(np.float64)


def _footprints(rng: np.random.Generator, n: int, h: int, w: int, p: dict) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    margin = min(p["neuron_sigma_px"], (min(h, w) - 1) / 2)
    out = np.zeros((n, h, w), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.uniform(margin, h - 1 - margin), rng.uniform(margin, w - 1 - margin)
        s_minor = p["neuron_sigma_px"] * rng.uniform(0.85, 1.15)
        s_major = s_minor * (1 + rng.uniform(0, p["neuron_ellipticity"]))
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        f = np.exp(-0.5 * ((u / s_major) ** 2 + (v / s_minor) ** 2))
        f[f < 0.02] = 0.0  # finite support keeps cells separable
        out[i] = f
    return out


def _slow_process(rng: np.random.Generator, frames: int, tau_frames: float) -> np.ndarray:
    """Unit-variance AR(1) process with correlation time ``tau_frames``."""
    a = math.exp(-1.0 / max(tau_frames, 1e-6))
    z = np.empty(frames)
    z[0] = rng.standard_normal()
    noise = rng.standard_normal(frames) * math.sqrt(1 - a * a)
    for t in range(1, frames):
        z[t] = a * z[t - 1] + noise[t]
    return z


def simulate_movie(preset: str = "default", frames: int = 200, height: int = 64, width: int = 64,
                   num_neurons: int | None = None, seed: int = 0, rate_hz: float | None = None,
                   return_clean: bool = True, chunk_frames: int = 64, **overrides: float) -> tuple[Movie, GroundTruth]:
    """Simulate a uint16 movie ``[frames, height, width]`` and its ground truth, deterministic in ``seed``."""
    if preset not in PRESETS:
        raise ConfigError(f"simulator preset {preset!r}: expected one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(PRESETS[preset]))
    if unknown:
        raise ConfigError(f"simulator overrides {unknown}: expected keys of preset {preset!r}: {sorted(PRESETS[preset])}")
    if min(frames, height, width) < 1:
        raise ConfigError(f"simulator shape {(frames, height, width)}: expected positive frames/height/width")
    p = {**PRESETS[preset], **{k: float(v) for k, v in overrides.items()}}
    if rate_hz is not None:
        p["rate_hz"] = float(rate_hz)
    rng = np.random.default_rng(seed)
    n = int(round(p["neurons_per_kpx"] * height * width / 1000)) if num_neurons is None else int(num_neurons)

    motion = int(round(p["motion_px"]))
    ch, cw = height + 2 * motion, width + 2 * motion  # canvas, cropped per frame when the field moves
    fp_canvas = _footprints(rng, n, ch, cw, p)
    field = gaussian_filter(rng.standard_normal((ch, cw)), sigma=max(ch, cw) / 8, mode="wrap")
    field /= field.std() + 1e-12
    background = (p["background_photons"] * np.clip(1 + p["background_contrast"] * field, 0.2, None)).astype(np.float32)

    spikes = rng.poisson(p["spike_rate_hz"] / p["rate_hz"], size=(n, frames)).astype(np.int32)
    kernel = calcium_kernel(p["rate_hz"], p["tau_rise_s"], p["tau_decay_s"])
    traces = np.stack([np.convolve(s, kernel)[:frames] for s in spikes]).astype(np.float32) if n else \
        np.zeros((0, frames), np.float32)
    brightness = p["neuron_photons"] * rng.uniform(0.6, 1.4, size=n)
    neuron_flux = (brightness[:, None] * (1 + p["dff_per_spike"] * traces)).astype(np.float32)  # [N, T]

    t_s = np.arange(frames) / p["rate_hz"]
    modulation = (1 + p["drift"] * np.sin(2 * np.pi * t_s / p["drift_period_s"] + rng.uniform(0, 2 * np.pi))
                  + p["neuropil_fluctuation"] * _slow_process(rng, frames, p["neuropil_tau_s"] * p["rate_hz"]))
    modulation = np.clip(modulation, 0.05, None).astype(np.float32)
    shifts = np.zeros((frames, 2), dtype=np.int32)
    if motion:
        steps = rng.integers(-1, 2, size=(frames, 2))
        shifts = np.clip(np.cumsum(steps, axis=0), -motion, motion).astype(np.int32)

    movie = np.empty((frames, height, width), dtype=np.uint16)
    clean = np.empty((frames, height, width), dtype=np.float32) if return_clean else None
    fp_flat = fp_canvas.reshape(n, ch * cw)  # explicit size: -1 is ambiguous for n = 0 neurons
    for t0 in range(0, frames, chunk_frames):
        t1 = min(frames, t0 + chunk_frames)
        flux = background[None] * modulation[t0:t1, None, None]
        if n:
            flux = flux + (neuron_flux[:, t0:t1].T @ fp_flat).reshape(t1 - t0, ch, cw)
        flux = np.stack([f[motion + dy: motion + dy + height, motion + dx: motion + dx + width]
                         for f, (dy, dx) in zip(flux, shifts[t0:t1])]).astype(np.float32)
        photons = rng.poisson(flux)
        adu = p["offset"] + p["gain"] * photons + rng.normal(0.0, p["read_noise"], size=flux.shape)
        movie[t0:t1] = np.clip(np.rint(adu), 0, UINT16_MAX).astype(np.uint16)
        if clean is not None:
            clean[t0:t1] = flux

    footprints = fp_canvas[:, motion: motion + height, motion: motion + width].copy()
    rois = footprints >= 0.3
    truth = GroundTruth(spikes=spikes, traces=traces, footprints=footprints, rois=rois, gain=p["gain"],
                        offset=p["offset"], read_noise=p["read_noise"], clean=clean,
                        background=background[motion: motion + height, motion: motion + width].copy(), shifts=shifts)
    meta = {"preset": preset, "seed": seed, "num_neurons": n, "params": p}
    mv = Movie(data=movie, rate_hz=p["rate_hz"], source=f"sim-{preset}-seed{seed}", gain=p["gain"], offset=p["offset"],
               read_noise=p["read_noise"], rois=rois, meta=meta)
    return mv, truth
