"""Sweep quality scores (cadiff.eval.score) and how a sweep names, ranks and tabulates its trials by them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cadiff.config import compose
from cadiff.errors import ConfigError, DataError
from cadiff.eval.score import reconstruction_score, sample_mmd2
from cadiff.tune.report import column_names
from cadiff.tune.space import Param, SearchSpace
from cadiff.tune.sweep import rank_rows, result_rows


@pytest.fixture(scope="module")
def photon_clips() -> np.ndarray:
    """Four simulated 16x24x24 clips in photon units (shot noise: photon-transfer gain ~1)."""
    from cadiff.data.simulate import simulate_movie

    movie, _ = simulate_movie(frames=64, height=24, width=24, seed=3)
    photons = (movie.data.astype(np.float64) - movie.offset) / movie.gain
    return photons.reshape(4, 16, 24, 24)


def test_reconstruction_score_is_the_latent_use_for_a_noise_faithful_decoder(photon_clips):
    same = reconstruction_score(photon_clips, photon_clips.copy(), latent_use=0.25)
    assert same["score_gain_ratio"] == pytest.approx(1.0) and same["score"] == pytest.approx(0.25)


def test_reconstruction_score_penalizes_lost_and_added_noise_alike(photon_clips):
    rng = np.random.default_rng(0)
    smoothed = np.repeat(photon_clips.reshape(4, 8, 2, 24, 24).mean(axis=2), 2, axis=1)  # averages pairs of frames
    # extra shot-like noise (variance ~ mean) doubles the gain; a constant variance would only move the offset
    noisier = photon_clips + rng.normal(size=photon_clips.shape) * np.sqrt(photon_clips.clip(0))
    lost = reconstruction_score(photon_clips, smoothed, latent_use=0.0)
    added = reconstruction_score(photon_clips, noisier, latent_use=0.0)
    assert lost["score_gain_ratio"] < 0.8 and added["score_gain_ratio"] > 1.5, (lost, added)
    assert lost["score"] == pytest.approx(abs(1 - lost["score_gain_ratio"])) and lost["score"] > 0.2
    # a decoder that ignores its latent (latent_use 1) is worse than one with the same noise that uses it
    assert reconstruction_score(photon_clips, photon_clips, 1.0)["score"] > reconstruction_score(photon_clips, photon_clips, 0.1)["score"]


def test_reconstruction_score_ranks_a_blank_or_diverged_decoder_last_and_rejects_bad_inputs(photon_clips):
    assert reconstruction_score(photon_clips, np.zeros_like(photon_clips), 0.5)["score"] == math.inf
    assert reconstruction_score(photon_clips, np.full_like(photon_clips, np.nan), 0.5)["score"] == math.inf
    assert reconstruction_score(photon_clips, photon_clips, math.nan)["score"] == math.inf
    with pytest.raises(DataError, match=r"inputs \(4, 16, 24, 24\) and reconstructions \(4, 16, 24, 12\) differ"):
        reconstruction_score(photon_clips, photon_clips[..., :12], 0.5)
    with pytest.raises(DataError, match="no positive photon-transfer gain"):
        reconstruction_score(np.ones_like(photon_clips), photon_clips, 0.5)


def test_sample_mmd2_is_small_for_the_held_out_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    held_out = rng.normal(size=(16, 4, 3, 4, 4))
    same = sample_mmd2(rng.normal(size=(16, 4, 3, 4, 4)), held_out)["score"]
    shifted = sample_mmd2(rng.normal(size=(16, 4, 3, 4, 4)) + 1.0, held_out)["score"]
    assert abs(same) < 0.05 and shifted > 10 * max(abs(same), 1e-3), (same, shifted)
    assert sample_mmd2(np.full((16, 4, 3, 4, 4), np.inf), held_out)["score"] == math.inf
    with pytest.raises(DataError, match="samples of 64 values and held-out of 192"):
        sample_mmd2(held_out[:, :, :1], held_out)
    with pytest.raises(DataError, match="non-finite values in the held-out"):
        sample_mmd2(held_out, np.full_like(held_out, np.nan))


def test_stage_scores_run_on_tiny_models():
    """Each stage's quality_score on an untrained tiny model: the documented parts (stage 1: inf where the blank
    decoder's gain is undefined, the ranking's last place)."""
    from cadiff.data.simulate import simulate_movie
    from cadiff.models.registry import build_model
    from cadiff.train.stage import DataInfo, get_stage

    torch.manual_seed(0)
    movies = [simulate_movie(frames=17, height=32, width=32, seed=seed)[0] for seed in (0, 1)]
    calib = {"gain": float(movies[0].gain), "offset": float(movies[0].offset), "read_noise": float(movies[0].read_noise)}
    photons = np.stack([(m.data.astype(np.float64) - calib["offset"]) / calib["gain"] for m in movies])
    norm = {"kind": "photon", "center": float(photons.mean()), "scale": float(photons.std())}
    clips = torch.from_numpy(((photons - norm["center"]) / norm["scale"]).astype(np.float32))[:, None]
    # the pixel noise level in normalized units, as the trainer derives it from the data index
    noise_std = float(np.sqrt(photons.mean())) / norm["scale"]
    ae = build_model(compose("train_ae", ["experiment=ae_tiny", f"model.noise_std={noise_std}"]).model).eval()
    info = DataInfo(root="-", sample_shape=(1, 17, 32, 32), num_train_clips=1, normalization=norm, sources={"sim": calib})
    with torch.no_grad():
        scored = get_stage("ae").quality_score(ae, clips, info)
    assert set(scored) == {"score", "score_gain_ratio", "score_latent_use"}, scored
    # an untrained head is blank (zero-initialised output), so the reconstructions are the constant centre plus
    # Gaussian noise: their photon-transfer gain is near 0 or undefined, and an undefined one ranks last (inf)
    expected = abs(1 - scored["score_gain_ratio"]) + scored["score_latent_use"]
    assert scored["score"] == (pytest.approx(expected) if math.isfinite(expected) else math.inf), scored
    latent_model = build_model(compose("train_latent", ["experiment=dit_tiny", "model.in_channels=4"]).model).eval()
    val_latents = torch.randn(4, 4, 5, 4, 4)
    info = DataInfo(root="-", sample_shape=(4, 5, 4, 4), num_train_clips=1)
    with torch.no_grad():
        scored = get_stage("latent").quality_score(latent_model, val_latents, info)
    assert set(scored) == {"score"} and math.isfinite(scored["score"])


def test_sweep_metric_and_trainer_score_are_validated():
    assert compose("sweep", []).metric == "score"
    with pytest.raises(ConfigError, match=r"'metric' = 'loss': expected one of \['score', 'val_loss', 'chain_score'\]"):
        compose("sweep", ["metric=loss"])
    with pytest.raises(ConfigError, match=r"'data.num_val_clips' = 1: expected >= 2 with trainer.score=true"):
        compose("train_ae", ["trainer.score=true", "data.num_val_clips=1"])
    with pytest.raises(ConfigError, match=r"'latents.num_val_clips' = 1"):
        compose("train_latent", ["trainer.score=true", "latents.num_val_clips=1"])


# ---------------------------------------------------------------------------------------------------------
# naming and ranking


def _space() -> SearchSpace:
    params = {"model.diffusion.objective": Param("model.diffusion.objective", "choice", ("flow", "ddpm")),
              "trainer.lr": Param("trainer.lr", "loguniform", (1e-4, 1e-3))}
    return SearchSpace(name="s", path=None, stage="ae", job="train_ae", experiment="ae_tiny", params=params)


def _results() -> list[SimpleNamespace]:
    # the DDPM trial has the lower val_loss, the flow trial the lower score; the third never reported
    metrics = [{"val_loss": 1.509, "score": 0.3, "step": 3, "trial_id": "a_00000"},
               {"val_loss": 1.244, "score": 0.9, "step": 3, "trial_id": "a_00001"},
               {"step": 1, "trial_id": "a_00002"}]
    configs = [{"model.diffusion.objective": o, "trainer.lr": 3e-4} for o in ("flow", "ddpm", "flow")]
    # Tune's result grid is not in trial order: the names follow the trial ids
    return [SimpleNamespace(metrics=m, config=c, path="/x/" + "run_trial_" + "y" * 120, error=None if "score" in m else "boom")
            for m, c in reversed(list(zip(metrics, configs)))]


@pytest.mark.parametrize(("metric", "order"), [("score", ["t01", "t02", "t03"]), ("val_loss", ["t02", "t01", "t03"])])
def test_trials_get_short_names_and_are_ranked_by_the_chosen_metric(tmp_path, metric, order):
    cfg = compose("sweep", [f"metric={metric}", "mode=min"])
    rows, trials = result_rows(_results(), _space(), cfg, tmp_path, max_steps=3)
    assert [r["trial"] for r in rows] == order and [r["rank"] for r in rows] == [1, 2, None]
    assert rows[0]["score"] is not None and rows[0]["val_loss"] is not None  # both columns, whichever ranks
    assert rows[-1]["status"] == "error" and rows[-1]["score"] is None
    assert trials["t01"] == tmp_path / "trials" / "train_ae" / "trial_a_00000"
    assert max(len(r["trial"]) for r in rows) == 3


def test_rank_rows_keeps_non_finite_values_unranked_and_max_mode_reverses():
    rows = [{"m": 2.0}, {"m": math.inf}, {"m": 1.0}, {"m": None}]
    assert [r["m"] for r in rank_rows([dict(r) for r in rows], "m", "min")][:2] == [1.0, 2.0]
    ranked = rank_rows([dict(r) for r in rows], "m", "max")
    assert [r["m"] for r in ranked[:2]] == [2.0, 1.0] and [r.get("rank") for r in ranked[2:]] == [None, None]


def test_column_names_shorten_swept_keys_unless_ambiguous():
    keys = ["trial", "model.diffusion.shift", "model.lr", "trainer.lr", "model.score", "score"]
    names = column_names(keys, ["model.diffusion.shift", "model.lr", "trainer.lr", "model.score"])
    assert names == {"trial": "trial", "model.diffusion.shift": "shift", "model.lr": "model.lr",
                     "trainer.lr": "trainer.lr", "model.score": "model.score", "score": "score"}
