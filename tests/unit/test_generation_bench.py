"""cadiff.bench.generation: summary keys, not-measured reasons, goal halves, results rendering (no training)."""

import json
from pathlib import Path

import numpy as np
import pytest

from cadiff.bench import generation as g
from cadiff.errors import ConfigError

HEADLINE = {"mmd2": 0.05, "mmd2_split_half": 0.02, "gain_ratio": 0.95}
LONG = {"seam_ratio": 1.2, "gain_drift": 0.08, "rollout_fps": 3.0}


def test_summary_has_exactly_the_issue_keys_and_a_reason_for_every_null():
    summary, reasons = g.summarize(HEADLINE, LONG, g.conditioning_metrics())
    assert tuple(summary) == g.SUMMARY_KEYS
    assert summary["mmd2"] == 0.05 and summary["rollout_fps"] == 3.0
    assert set(reasons) == {"roi_f1", "null_rois", "gain_cond_max_err"} and "cond" in reasons["roi_f1"]
    failed = {"reason": "the 257-frame sample job failed: boom"}
    summary, reasons = g.summarize({**HEADLINE, "gain_ratio": float("nan")}, failed, g.conditioning_metrics())
    assert summary["gain_ratio"] is None and reasons["gain_ratio"] == g.NOT_FINITE
    assert summary["seam_ratio"] is None and reasons["seam_ratio"] == failed["reason"]


def test_goals_check_each_half_separately():
    summary, _ = g.summarize(HEADLINE, LONG, g.conditioning_metrics())
    status = {(r["goal"], r["condition"]): r["status"] for r in g.goals(summary)}
    assert status[("sample quality", "MMD^2 <= 2 x split-half MMD^2 of the held-out movies (= 0.040)")] == "not met"  # 2.5x
    negative = {**summary, "mmd2": 0.1, "mmd2_split_half": -0.0004}  # the unbiased split-half can be < 0
    assert g.goals(negative)[0]["status"] == "not met" and g.goals({**negative, "mmd2": -0.001})[0]["status"] == "met"
    assert status[("sample quality", "gain ratio in [0.9, 1.1]")] == "met"
    assert status[("long movies", "seam ratio <= 1.5")] == "met"
    assert status[("long movies", "gain drift < 5%")] == "not met"
    assert status[("ROI masks", "null test: 0 detected ROIs (empty-mask movies)")] == "not measured"


def test_config_validation_names_the_option():
    with pytest.raises(ConfigError, match="num_samples = 10: expected >= 64"):
        g.validate(g.GenConfig(num_samples=10))
    with pytest.raises(ConfigError, match="long_frames = 100: expected 1 \\+ k\\*4"):
        g.validate(g.GenConfig(long_frames=100))
    for frames in (255, 257, 13):  # not 1 + k*4; longer than the held-out movies; shorter than a clip
        with pytest.raises(ConfigError, match=f"roi_frames = {frames}: expected 1 \\+ k\\*4 frames from clip_frames "
                           "17 to the held-out movies' 255"):
            g.validate(g.GenConfig(roi_frames=frames))
    assert g.validate(g.GenConfig(**g.QUICK)).num_samples == 64
    with pytest.raises(ConfigError, match="cond_dit_steps = 0: expected >= 1 training steps of the conditioned DiT"):
        g.validate(g.GenConfig(cond_dit_steps=0))
    with pytest.raises(ConfigError, match=r"ae_overrides .*mean_target"):
        g.validate(g.GenConfig(ae_overrides=["model.mean_target=clean"]))
    assert g.validate(g.GenConfig(ae_overrides=["model.mean_target=photon_split"])).ae_overrides


def test_cli_bad_option_is_one_line_and_runs_nothing(tmp_path: Path, capsys):
    assert g.main(["--quick", "--threads", "0", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().out == "generation: error: generation option threads = 0: expected >= 1 torch threads\n"
    assert g.main(["--ae-steps", "0", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().out == ("generation: error: generation option ae_steps = 0: expected >= 1 training "
                                       "steps of stage 1\n")
    assert not any(tmp_path.iterdir())


def test_flips_keep_every_clip_and_add_three_mirrors():
    clips = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    out = g.flips(clips)
    assert out.shape == (8, 3, 4, 4)
    np.testing.assert_array_equal(out[2:4], clips[:, :, ::-1])
    np.testing.assert_array_equal(out[6:8], clips[:, :, ::-1, ::-1])


PERSISTENCE = {"segment": 65, "persistence": 0.5, "mean_image_corr": 0.7, "mean_flux": 0.15, "rois_per_segment": 2.0,
               "whole_movie_rois": 1}


def fake_result() -> dict:
    summary, reasons = g.summarize(HEADLINE, LONG, g.conditioning_metrics())
    row = {"sampler": "euler", "steps": 20, "nfe": 20, "dit_s_per_clip": 0.01, "decode_s_per_clip": 0.3,
           "latent_mmd2": 0.01, **HEADLINE, "temporal_psd_distance_db": 0.5}
    return {"summary": summary, "not_measured": reasons, "goals": g.goals(summary), "sampler_table": [row],
            "long_movie": {**LONG, "num_frames": 257, "chunks": 21, "wall_s": 85.0, "gain_first": 480.0,
                           "gain_last": 520.0, "calibrated_gain": 500.0, "files": ["sample_000.tif"], "seams": [16],
                           "persistence": PERSISTENCE, "persistence_real": [PERSISTENCE],
                           "guided": {"chunks": 85, "rollout_fps": 20.0, "seam_ratio": 1.1, "gain_drift": 0.05,
                                      "context_frames": 4, "context_guidance": 4.0, "persistence": PERSISTENCE}},
            "activity": {"held_out_truth": {"event_rate_hz": [0.3, 0.5], "amplitude_dff": [0.4]}, "held_out_rois": 2,
                         "held_out_movies": 1, "not_measured": "no generated long movie (the sample job failed)"},
            "training": {"ae": {"steps": 3, "final_loss": 1.0}, "dit": {"steps": 3, "final_loss": 1.0},
                         "train_latents": 8},
            "config": {**g.dataclasses.asdict(g.GenConfig(**g.QUICK))}, "timings": {"total_s": 60.0},
            "held_out_clips": 4, "meta": {"cpus": 2, "torch": "x"}, "quick": True}


def test_markdown_and_figures_render_from_a_result(tmp_path: Path):
    res = fake_result()
    rng = np.random.default_rng(0)
    arrays = {"gen": rng.poisson(1.0, (8, 17, 8, 8)).astype(np.float32),
              "ref": rng.poisson(1.0, (8, 17, 8, 8)).astype(np.float32),
              "long": rng.poisson(1.0, (33, 8, 8)).astype(np.float32), "seams": [16]}
    figures = g.write_figures(arrays, tmp_path / "generation")
    assert figures == ["generation_samples.png", "generation_kymograph.png"]
    square = np.zeros((8, 8), bool)
    square[2:5, 2:5] = True
    tile = {"requested": square, "real": arrays["gen"][0].mean(axis=0), "real_found": square,
            "sample": arrays["ref"][0].mean(axis=0), "sample_found": np.zeros((8, 8), bool)}
    arrays["masks"] = {"detector": "mean", "frames": 17, "tiles": [tile, tile], "null": tile["real"],
                       "null_found": square}
    assert g.write_figures(arrays, tmp_path / "generation")[2] == "generation_masks.png"
    assert (tmp_path / "generation_masks.png").stat().st_size > 0
    assert all((tmp_path / f).stat().st_size > 0 for f in figures)
    md = g.render_markdown(res, figures)
    assert "| `roi_f1` | - | " + g.conditioning_metrics()["reason"] in md and "**not met**" in md and "not measured" in md
    assert "| generated, context_frames=4 context_guidance=4 | 0.500 | 2.000 | 1 | 0.700 | 0.150 |" in md
    assert "85 chunks, 20.0 frames/s" in md
    json.dumps(res)  # the result is plain JSON
    # several long movies: a row each and their mean, the signed drift beside the simulated movies' spread
    res["long_movie"].update(movies=2, gain_drift_signed_mean=0.01, gain_drift_signed_sem=0.07, gain_drift_real=[0.02, 0.04],
                             each=[{"seed": 0, "wall_s": 40.0, "seam_ratio": 1.1, "gain_first": 480.0, "gain_last": 520.0,
                                    "gain_drift": 0.083},
                                   {"seed": 1, "wall_s": 45.0, "seam_ratio": 1.3, "gain_first": 500.0, "gain_last": 470.0,
                                    "gain_drift": 0.06}])
    md = g.render_markdown(res, figures)
    assert "2 movies of 257 frames in 21 chunks each" in md
    assert "| 0 | 40.0 | 1.100 | 480.0 | 520.0 | 0.083 |" in md and "| 1 | 45.0 | 1.300 | 500.0 | 470.0 | 0.060 |" in md
    assert "| mean | 42.5 | 1.200 | | | 0.080 |" in md
    assert "0.020, 0.040 (mean 0.030). Signed drift (last/first - 1) over the movies: +0.0100 +- 0.0700" in md
    # the features behind the MMD^2, largest shift first; the worst flux level against the goal in standard errors
    res["headline"] = {"feature_shift": {"log_mean": 0.1, "corr_median": -0.9, "offset": None, "acf_1": 0.5}}
    flux = [{"factor": 0.5, "requested": 0.1, "measured": 0.095, "rel_err": 0.05, "rel_se": 0.01},
            {"factor": 2.0, "requested": 0.4, "measured": 0.356, "rel_err": 0.11, "rel_se": 0.002}]
    md = g.render_markdown(res, figures)
    assert "- headline samples: `corr_median` -0.90, `acf_1` +0.50, `log_mean` +0.10" in md
    assert g.flux_margin_lines(flux)[-1] == (
        "Worst level x2.0: error 0.110, outside the goal by 5.0 standard errors.")


def test_long_movies_average_seam_and_drift_over_the_seeds(monkeypatch, tmp_path: Path):
    """The summary's seam ratio and gain drift are means over the movies; a drift that flips sign averages out in
    the signed mean but not in the mean |drift|; frames/s counts every movie's frames and wall time."""
    made = []

    def fake_long_movie(stage2, out, frames, seed, *extra):
        made.append((out.name, seed))
        ratio = {0: 1.06, 1: 0.96, 2: 1.02}[seed]
        return {"movie": np.zeros((frames, 2, 2)), "record": {}, "num_frames": frames, "chunks": 3,
                "wall_s": 10.0 + seed, "rollout_fps": frames / (10.0 + seed), "seam_ratio": 1.0 + seed / 10,
                "gain_first": 500.0, "gain_last": 500.0 * ratio, "last_over_first": ratio, "gain_drift": abs(ratio - 1),
                "files": []}

    monkeypatch.setattr(g, "long_movie", fake_long_movie)
    cfg = g.GenConfig(long_frames=33, long_movies=3)
    out = g.long_movies(tmp_path / "models", tmp_path, cfg)
    assert made == [("long_movie", 0), ("long_movie_more", 1), ("long_movie_more", 2)]
    assert out["movies"] == 3 and [e["seed"] for e in out["each"]] == [0, 1, 2] and out["movie"].shape == (33, 2, 2)
    assert out["seam_ratio"] == pytest.approx(1.1) and out["gain_drift"] == pytest.approx(0.04)
    assert out["gain_drift_signed_mean"] == pytest.approx(0.04 / 3)
    assert out["gain_drift_signed_sem"] == pytest.approx(np.std([0.06, -0.04, 0.02], ddof=1) / np.sqrt(3))
    assert out["rollout_fps"] == pytest.approx(99 / 33.0) and out["wall_s"] == pytest.approx(33.0)


def test_cell_persistence_is_high_for_a_fixed_field_and_low_when_the_cells_move():
    from cadiff.bench.stage2 import cell_persistence
    from cadiff.data.movie import to_photons
    from cadiff.data.simulate import simulate_movie

    def photons(seed: int, frames: int) -> np.ndarray:
        movie, _ = simulate_movie("two_photon", frames, 32, 32, seed=seed, return_clean=False)
        return to_photons(movie.data, movie.gain, movie.offset)

    fixed = cell_persistence(photons(801, 260))
    moving = cell_persistence(np.concatenate([photons(801 + i, 65) for i in range(4)]))  # a new field per piece
    assert fixed["persistence"] > 0.6 and fixed["whole_movie_rois"] >= 1
    assert moving["persistence"] is not None and moving["persistence"] < 0.3
    # no detector in between; different fields of one preset still share its illumination profile (~0.3)
    assert fixed["mean_image_corr"] > 0.6 and moving["mean_image_corr"] < fixed["mean_image_corr"] - 0.3


def test_movie_roi_lines_show_samples_beside_the_ceiling_and_the_null_test():
    match = {"f1": 0.5, "precision": 0.75, "recall": 0.375, "n_pred": 4, "n_true": 8, "hits": 3}
    movie = {"frames": 253, "tiles": 2, "samples_per_mask": 4, "detector": "mean",
             "detector_ceilings": {"correlation": {**match, "f1": 0.1}, "mean": match}, "roi": match,
             "roi_ceiling": {**match, "f1": 0.9}, "null_samples": 16, "null_rois": 1, "null_rois_real": 0}
    text = "\n".join(g.movie_roi_lines(movie))
    assert "| samples for the masks | 0.500 | 0.750 | 0.375 | 4 / 8 |" in text
    assert "| the real tiles (ceiling) | 0.900 |" in text and "correlation F1 0.100, mean F1 0.500" in text
    assert "1 ROIs detected in 16 samples for an empty mask; 0 in as many real cell-free movies" in text
    assert g.movie_roi_lines(None) == []


def test_real_floor_clips_are_one_per_new_movie_and_render_beside_the_samples():
    cfg = g.GenConfig(clip_side=16, movie_side=32, test_clips_per_tile=2)
    clips = g.fresh_real_clips(cfg, 3, 500)
    assert clips.shape == (3, 17, 16, 16) and clips.dtype == np.float32
    np.testing.assert_array_equal(clips, g.fresh_real_clips(cfg, 3, 500))  # seeded
    assert not np.array_equal(clips[0], clips[1])  # other movies, not tiles of one
    floor = {"num": 3, "mmd2": 0.02, "gain_ratio": 1.0, "mmd2_split_half": 0.05, "mmd2_split_half_std": 0.01,
             "split_recordings": 8}
    lines = g.real_floor_lines(floor, {"mmd2": 0.04})
    assert "3 clips of new simulated movies" in lines[-1] and "MMD^2 0.020" in lines[-1]
    assert "Headline samples: MMD^2 0.040" in lines[-1] and "splits of its 8 movies" in lines[-1]
    assert g.real_floor_lines(None, {}) == []
