"""Smoke and known-answer tests of the AE-quality benchmark (``cadiff.bench.ae_quality``) at a microscopic size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cadiff.errors import ConfigError

TINY_MODEL = ["model.base_channels=4", "model.dec_base_channels=4", "model.z_channels=2",
              "model.recompute_elementwise=false"]


@pytest.fixture(scope="module")
def aq():
    from cadiff.bench import ae_quality

    return ae_quality


@pytest.fixture(scope="module")
def small(aq):
    """Two 34x32x32 held-out movies (16 clips of 17x16x16) and a tiny training movie."""
    cfg = aq.BenchConfig(clip_side=16, movie_side=32, train_movies=1, train_frames=34, test_movies=2,
                         test_clips_per_tile=2, seed=3)
    data = aq.simulate_data(cfg)
    return cfg, data, aq.held_out_clips(data, cfg)


def test_tiling_round_trip(aq):
    movie = np.random.default_rng(0).random((34, 32, 48)).astype(np.float32)
    origins = aq.tile_origins(movie.shape, 17, 16)
    assert len(origins) == 2 * 2 * 3
    clips = aq.cut_clips(movie, origins, 17, 16)
    assert clips.shape == (12, 17, 16, 16)
    np.testing.assert_array_equal(aq.stitch(clips, origins, movie.shape), movie)


def test_steps_for_nfe(aq):
    assert aq.steps_for_nfe("euler", 5) == 5
    assert aq.steps_for_nfe("heun", 5) == 3  # NFE 6: Heun costs two evaluations per step here
    assert aq.steps_for_nfe("midpoint", 50) == 25
    with pytest.raises(ConfigError, match="sampler 'ddim'"):
        aq.steps_for_nfe("ddim", 10)


def test_metrics_separate_generative_from_denoising_oracles(aq, small):
    """Known answers: the input scores gain 1 / error 0, a fresh noise draw ~1, the clean flux ~0."""
    cfg, data, ev = small
    same = aq.evaluate_reconstruction(ev.inputs, ev, data, mmd=False)
    assert same["gain_ratio"] == pytest.approx(1.0)
    assert same["corr_image_error"] == pytest.approx(0.0, abs=1e-12)
    resample = aq.evaluate_reconstruction(aq.oracle_resample(ev.clean, data, seed=1), ev, data, mmd=False)
    assert 0.85 < resample["gain_ratio"] < 1.15
    denoised = aq.evaluate_reconstruction(ev.clean.astype(np.float32), ev, data, mmd=False)
    assert denoised["gain_ratio"] is None or denoised["gain_ratio"] < 0.1
    assert denoised["corr_image_error"] > 5 * resample["corr_image_error"]
    assert denoised["rmse_to_clean"] == pytest.approx(0.0, abs=1e-4)
    # a decoder that ignores the latent can have the right noise; trace r and RMSE expose it
    elsewhere = aq.evaluate_reconstruction(aq.unconditional_sample(ev), ev, data, mmd=False)
    assert 0.7 < elsewhere["gain_ratio"] < 1.4
    assert elsewhere["rmse_to_clean"] > 2 * resample["rmse_to_clean"]
    assert elsewhere["trace_corr"] < same["trace_corr"] - 0.3
    # half the noise amplitude keeps a quarter of the variance: the pooled photon-transfer ratio tracks it
    quarter = ev.clean + 0.5 * (ev.inputs - ev.clean)
    assert aq.gain_metrics(quarter, ev.inputs)["gain_ratio"] == pytest.approx(0.25, abs=0.05)


def test_trace_correlation_known_cases(aq, small):
    cfg, data, ev = small
    truth = data.held_out[0].truth
    clean_r = aq.trace_correlations(truth.clean, truth)
    spiking = np.isfinite(clean_r)
    assert spiking.any()
    assert np.all(clean_r[spiking] > 0.9)  # the clean flux inside an ROI follows its own calcium trace
    flat = aq.trace_correlations(np.ones_like(truth.clean), truth)
    assert np.all(flat[spiking] == 0.0)


def _summary(**changes):
    good = {"gain_ratio": 1.0, "noise_var_ratio": 1.0, "trace_r": 0.8, "trace_r_regression": 0.8, "latent_use": 0.1,
            "corr_err": 0.1, "corr_err_regression": 0.5, "corr_err_other_clip": 0.3, "psnr_denoised_db": 30.0,
            "psnr_regression_db": 29.0}
    return {"default": {**good, **changes}, "real": {"m": {"gain_ratio": 1.0, "corr_err": 0.1,
                                                          "corr_err_regression": 0.2, "noise_var_ratio": 1.0}}}


def test_verdict_checks_every_goal(aq):
    assert aq.verdict(_summary())["all_met"]
    for change, goal in [({"gain_ratio": 1.08}, "gain_ratio"), ({"noise_var_ratio": 1.2}, "noise_var_ratio"),
                         ({"trace_r": 0.7}, "trace_r"), ({"latent_use": 0.3}, "latent_use"),
                         ({"corr_err": 0.6}, "corr_err_vs_regression"), ({"corr_err": 0.2}, "corr_err_vs_other_clip"),
                         ({"psnr_denoised_db": 28.0}, "psnr_denoised"), ({"gain_ratio": None}, "gain_ratio")]:
        v = aq.verdict(_summary(**change))
        assert not v["all_met"] and not v["goals"]["default"][goal], (change, v["goals"])
    bad_real = _summary()
    bad_real["real"]["m"]["gain_ratio"] = 0.8
    assert not aq.verdict(bad_real)["goals"]["real:m"]["gain_ratio"]


def test_aggregate_means_and_spreads(aq):
    rows = [{"a": 1.0, "b": None}, {"a": 3.0, "b": 2.0}]
    out = aq.aggregate(rows, ["a", "b"])
    assert out == {"a": 2.0, "a_spread": 2.0, "b": None, "b_spread": None}


def test_architectures_must_match(aq, small):
    _, data, _ = small
    cfg = aq.BenchConfig(model_overrides=TINY_MODEL)
    from cadiff.models.registry import build_model

    diffae = build_model(aq.model_config("diffae", cfg, data)[1])
    regression = build_model(aq.model_config("regression", cfg, data)[1])
    assert diffae.model_config["noise_model"]["kind"] == "anscombe"  # filled in as the trainer does
    aq.check_same_architecture(diffae, regression)
    wider = build_model(aq.model_config("regression", aq.BenchConfig(model_overrides=[*TINY_MODEL,
                                                                                      "model.base_channels=8"]),
                                        data)[1])
    with pytest.raises(ConfigError, match="base_channels"):
        aq.check_same_architecture(diffae, wider)


MICRO = dict(clip_frames=9, clip_side=16, movie_side=16, train_movies=1, train_frames=20, test_movies=2,
             test_clips_per_tile=2, model_overrides=[*TINY_MODEL, "model.residual_unet=true", "model.mean_head=unet"],
             steps=2, batch_size=1,
             warmup_steps=1,
             recon_steps=2, table_samplers=["euler", "heun"], table_nfe=[1, 2], table_grids=["uniform", "rho:2"],
             table_clips=2)


def test_run_microscopic_suite_end_to_end(aq, tmp_path):
    torch.manual_seed(0)
    suite = aq.run_suite(aq.BenchConfig(**MICRO), ["default"], [0, 1], real=False, workers=1)
    paths = aq.write_suite_results(suite, tmp_path / "ae_quality")
    saved = json.loads(Path(paths["json"]).read_text())
    assert set(saved["summary"]) == {"default", "real"} and saved["summary"]["real"] == {}
    expected = set(aq.HEADLINE_KEYS) | {f"{k}_spread" for k in aq.HEADLINE_KEYS}
    assert set(saved["summary"]["default"]) == expected
    first, second = saved["runs"]["default"]
    assert set(first["results"]) == {"diffae", "regression", "oracle_denoiser", "oracle_resample", "oracle_gaussian", "unconditional",
                                     "input"}
    assert first["results"]["diffae"]["nfe"] == 4 and first["results"]["regression"]["nfe"] == 1
    assert math.isfinite(first["results"]["diffae"]["psnr_denoised_db"])
    for kind in ("diffae", "regression"):
        assert len(first["training"][kind]["loss"]) == 2
        assert all(math.isfinite(v) for v in first["training"][kind]["loss"])
    # Euler steps == NFE; Heun's single step costs 2 evaluations; each grid in turn; the regression row closes it
    assert [(r["sampler"], r["grid"], r["nfe"]) for r in first["sampler_table"]] == [
        ("euler", "uniform", 1), ("euler", "uniform", 2), ("euler", "rho:2", 1), ("euler", "rho:2", 2),
        ("heun", "uniform", 2), ("heun", "uniform", 2), ("heun", "rho:2", 2), ("heun", "rho:2", 2),
        ("regression (L2)", None, 1)]
    # a 2-step Euler decode differs between grids (same noise draw): the grid reaches the decoder
    euler2 = [r for r in first["sampler_table"] if r["sampler"] == "euler" and r["nfe"] == 2]
    assert euler2[0]["rmse_to_clean"] != euler2[1]["rmse_to_clean"]
    assert second["sampler_table"] == []  # the table runs with the first seed only
    assert saved["verdict"]["all_met"] in (True, False) and "default" in saved["verdict"]["goals"]
    md = Path(paths["md"]).read_text()
    assert "## Summary" in md and "| DiffAE (flow decoder) |" in md and "## Sampler vs NFE" in md
    assert "| heun | rho:2 | 1 | 2 |" in md
    assert "skipped" in Path(paths["real_md"]).read_text()
    for figure in paths["figures"]:
        assert Path(figure).stat().st_size > 1000
    # re-rendered from the stored JSON (--from-json) under another prefix: its own real-movie file and figures
    for figure in paths["figures"]:
        Path(figure).rename(tmp_path / Path(figure).name.replace("ae_quality_", "variant_"))
    again = aq.write_suite_results(aq.suite_verdict(saved), tmp_path / "variant")
    assert again["figures"] == [] and "Real movies: `variant_real.md`." in Path(again["md"]).read_text()
    assert json.loads(Path(again["json"]).read_text())["figures"] == sorted(
        Path(f).name.replace("ae_quality_", "variant_") for f in paths["figures"])


def test_real_movie_run(aq):
    if not aq.REAL_DIR.exists():
        pytest.skip("shared/data/real not present")
    cfg = aq.BenchConfig(**{**MICRO, "clip_frames": 17, "table_clips": 0})
    data, info = aq.real_data(cfg, "allen_792757260")
    assert info["shape"] == [100, 100, 100] and info["train_frames"] == 70 and data.held_out[0].truth is None
    res = aq.run_real(cfg, "allen_792757260")
    assert set(res["headline"]) >= set(aq.REAL_KEYS) and res["headline"]["rmse_other_clip"] > 0
    assert "trace_corr" not in res["results"]["diffae"]  # no ground truth: no trace metric


def test_anscombe_normalization_round_trips_and_stabilizes_noise(aq):
    cfg = aq.BenchConfig(clip_side=16, movie_side=32, train_movies=1, train_frames=34, test_movies=1,
                         test_clips_per_tile=2, seed=3, normalization="anscombe")
    data = aq.simulate_data(cfg)
    photons = data.train[0]
    assert data.normalization == "anscombe" and data.read_noise_photons > 0
    x = data.to_model(photons)
    assert x.dtype == np.float32 and abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    np.testing.assert_allclose(data.to_photons(x), np.maximum(photons, -0.375 - data.read_noise_photons ** 2),
                               atol=2e-3 * float(np.abs(photons).max()))
    # variance-stabilized: frame-to-frame noise in Anscombe units is ~1 at any brightness (photons: ~the mean)
    f = aq.anscombe(photons.astype(np.float64), data.read_noise_photons)
    diff_var = np.var(np.diff(f, axis=0), axis=0) / 2
    bright = photons.mean(0) > np.percentile(photons.mean(0), 80)
    dim = photons.mean(0) < np.percentile(photons.mean(0), 20)
    assert 0.6 < diff_var[bright].mean() / diff_var[dim].mean() < 1.6
    with pytest.raises(ConfigError, match="normalization"):
        aq.simulate_data(aq.BenchConfig(normalization="log"))


def test_table_grids_are_checked_before_any_training(aq, capsys):
    a = aq.parse_args(["--table-grids", "uniform", "shift:0.5", "rho:2", "--table-samplers", "euler", "heun"])
    assert a.cfg.table_grids == ["uniform", "shift:0.5", "rho:2"] and a.cfg.table_samplers == ["euler", "heun"]
    assert aq.BenchConfig().table_grids == ["uniform"]  # the suite's table is unchanged by default
    with pytest.raises(SystemExit):
        aq.parse_args(["--table-grids", "rho:x"])
    assert "time grid 'rho:x': expected 'uniform', 'shift:S' (S > 0) or 'rho:R' (R > 0)" in capsys.readouterr().err


def test_ablation_trains_each_variant_for_its_steps_and_tabulates_them(aq, monkeypatch):
    """A variant of ABLATION_STEPS trains for its multiple of the steps (the equal-time row of the upsampling head)."""
    assert set(aq.ABLATION_STEPS) <= set(aq.ABLATION)
    name = next(iter(aq.ABLATION_STEPS))
    monkeypatch.setattr(aq, "ABLATION", {"default": [], name: aq.ABLATION[name]})
    monkeypatch.setattr(aq, "ABLATION_STEPS", {name: 2.0})
    cfg = aq.BenchConfig(**MICRO)
    rows = aq.run_ablation(cfg, workers=1)
    assert rows["default"]["steps"] == cfg.steps and rows[name]["steps"] == 2 * cfg.steps
    assert rows[name]["params"] < rows["default"]["params"]  # the upsampling head is the smaller network
    md = aq.render_ablation(rows, cfg)
    assert "| steps |" in md and f"| {name} |" in md
