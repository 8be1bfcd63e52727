"""Movies of any length (jobs/sample.py num_frames=N): validation, chunk plan, DiT continuation, streamed decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
import torch

from cadiff.config import compose
from cadiff.errors import ConfigError, ModelError
from cadiff.inference.long_movie import (
    chunk_spans,
    decode_stream,
    latent_frames_for,
    plan_long_movie,
    rollout_latents,
    window_generator,
)
from cadiff.models.autoencoder import REACH_LIMIT, REACH_TOL
from cadiff.models.registry import build_model
from cadiff.runtime.exports import export_model
from cadiff.testing import torch_threads

S_T = 4  # ae_tiny temporal_downsample
CHUNK = 5  # latent frames the tiny DiT is "trained" on (sample_shape)
MEAN_FLOW = ["model.noise_model.kind=anscombe", "model.noise_model.center=4.0", "model.noise_model.scale=0.5",
             "model.noise_model.read_noise_photons=0.2"]


def _dit():
    torch.manual_seed(0)
    model = build_model({"kind": "dit", "size": "tiny", "in_channels": 4}).eval()
    # the output layer is zero-initialized (the DiT would return its noise); give it weights
    torch.nn.init.normal_(model.dit.final_layer.linear.weight, std=0.05)
    for block in model.dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    return model


def _ae():
    torch.manual_seed(1)
    model = build_model(compose("train_ae", ["experiment=ae_tiny", *MEAN_FLOW]).model).eval()
    torch.nn.init.normal_(model.mean_decoder.conv_out.conv.weight, std=0.1)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """Random-init stage-1 and stage-2 exports (stage 2 on [4, CHUNK, 4, 4] latents); returns the stage-2 export."""
    tmp = tmp_path_factory.mktemp("exports")
    ae, dit = _ae(), _dit()
    calib = {"gain": 2.0, "offset": 100.0, "read_noise": 0.4, "rate_hz": 30.0}
    stage1 = export_model(tmp / "s1" / "export" / "model.pt", ae.state_dict(), ae.model_config,
                          {"stage": "ae", "data": {"sources": {"sim-000": calib}, "sample_shape": [1, 17, 32, 32],
                                                   "normalization": {"kind": "anscombe", "center": 4.0, "scale": 0.5}}})
    return export_model(tmp / "s2" / "export" / "model.pt", dit.state_dict(), dit.model_config,
                        {"stage": "latent", "data": {"stage1": str(stage1), "sample_shape": [4, CHUNK, 4, 4],
                                                     "channel_mean": [0.1] * 4, "channel_std": [0.5] * 4}})


def test_num_frames_not_one_plus_k_s_t_names_the_nearest_valid_counts() -> None:
    assert latent_frames_for(1025, S_T) == 257
    with pytest.raises(ConfigError, match=r"'num_frames' = 1024: expected 1 \+ k\*4 .*nearest valid: 1021 or 1025"):
        latent_frames_for(1024, S_T)
    with pytest.raises(ConfigError, match=r"'context_frames' = 5: expected 1 \.\. 4"):
        plan_long_movie(49, 5, None, CHUNK, S_T)
    for bad, key in (("num_frames=0", "num_frames"), ("context_frames=0", "context_frames")):
        with pytest.raises(ConfigError, match=f"config key '{key}' = 0: expected a positive frame count"):
            compose("sample", ["stage2=x", bad])
    with pytest.raises(ConfigError, match=r"'out_format' = 'nwb': expected 'tiff' with num_frames"):
        compose("sample", ["stage2=x", "num_frames=49", "out_format=nwb"])


@pytest.mark.parametrize("num_latent", [3, 5, 6, 13, 257])
def test_chunks_have_the_training_length_and_tile_the_movie(num_latent: int) -> None:
    spans = chunk_spans(num_latent, CHUNK, 2)
    assert spans[0][:2] == (0, 0)
    assert [s[1] for s in spans[1:]] == [s[2] for s in spans[:-1]] and spans[-1][2] == num_latent
    assert all(stop - start == CHUNK and start < new for start, new, stop in spans[1:])


def test_first_chunk_is_the_plain_sample_and_context_is_imposed() -> None:
    dit = _dit()
    plan = plan_long_movie(1 + 12 * S_T, None, None, CHUNK, S_T)
    chunks = list(rollout_latents(dit, plan, (1, 4, 4, 4), "euler", 4, torch.Generator().manual_seed(7)))
    plain = dit.sample((1, 4, CHUNK, 4, 4), "euler", 4, torch.Generator().manual_seed(7))
    assert torch.equal(chunks[0], plain)
    assert sum(c.shape[2] for c in chunks) == 13
    again = list(rollout_latents(dit, plan, (1, 4, 4, 4), "euler", 4, torch.Generator().manual_seed(7)))
    assert all(torch.equal(a, b) for a, b in zip(chunks, again))
    # the same draw with and without context: the new frames depend on the imposed context
    context = plain[:, :, -2:]
    cont = dit.sample((1, 4, CHUNK, 4, 4), "euler", 4, torch.Generator().manual_seed(3), context=context)
    free = dit.sample((1, 4, CHUNK, 4, 4), "euler", 4, torch.Generator().manual_seed(3))
    assert torch.equal(cont[:, :, :2], context) and not torch.allclose(cont[:, :, 2:], free[:, :, 2:])
    with pytest.raises(ModelError, match="context of shape"):
        dit.sample((1, 4, CHUNK, 4, 4), context=plain)


@pytest.mark.parametrize("objective", ["flow", "ddpm_v", "ddpm_eps"])
def test_shift_x0_moves_the_data_estimate_by_exactly_delta(objective: str) -> None:
    from cadiff.diffusion.ddpm import DDPM
    from cadiff.diffusion.flow import FlowMatching

    obj = FlowMatching() if objective == "flow" else DDPM(prediction=objective.split("_")[1])
    g = torch.Generator().manual_seed(0)
    out, x_t, delta = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.3, 0.9])
    shifted = obj.shift_x0(out, x_t, t, delta)
    torch.testing.assert_close(obj.predict_x0(shifted, x_t, t), obj.predict_x0(out, x_t, t) + delta)
    if objective == "flow":  # at t = 0 the estimate is x_t itself: nothing to move, no division by zero
        assert torch.equal(obj.shift_x0(out, x_t, torch.zeros(2), delta), out)


def test_context_guidance_pulls_the_new_frames_toward_the_context() -> None:
    """Reconstruction guidance on a model whose data estimate is the frame mean of x_t: the gradient of the context
    error reaches the new frames only through the model, and moves their estimate toward the context by exactly
    ``-(w alpha_t / 2) grad`` (Ho et al. 2022, eq. 7)."""
    dit = _dit()
    n, frames, w = 2, CHUNK, 3.0
    context = torch.full((1, 4, n, 4, 4), 2.0)
    x_t = torch.randn(1, 4, frames, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.6])

    def frame_mean_model(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:  # flow velocity with x0_hat = mean_T x
        return (x - x.mean(dim=2, keepdim=True).expand_as(x)) / time.view(-1, 1, 1, 1, 1)

    guided = dit._with_context(frame_mean_model, context, x_t.clone(), tuple(x_t.shape), w)(x_t, t)
    plain = dit._with_context(frame_mean_model, context, x_t.clone(), tuple(x_t.shape), 0.0)(x_t, t)
    imposed = x_t.clone()
    imposed[:, :, :n] = dit.objective.noised(context, x_t[:, :, :n], t)
    m = imposed.mean(dim=2, keepdim=True)
    expected = -(w * (1 - 0.6) / 2) * (2 * n / frames) * (m - context[:, :, :1])  # -(w alpha / 2) grad
    moved = dit.objective.predict_x0(guided, imposed, t) - dit.objective.predict_x0(plain, imposed, t)
    torch.testing.assert_close(moved[:, :, n:], expected.expand(-1, -1, frames - n, -1, -1))
    assert torch.equal(moved[:, :, :n], torch.zeros_like(moved[:, :, :n]))
    # end to end on the tiny DiT: the context comes back unchanged, the new frames differ from replacement alone
    gen = dit.sample((1, 4, CHUNK, 4, 4), "euler", 4, torch.Generator().manual_seed(3), context=context,
                     context_guidance=w)
    free = dit.sample((1, 4, CHUNK, 4, 4), "euler", 4, torch.Generator().manual_seed(3), context=context)
    assert torch.equal(gen[:, :, :n], context) and torch.isfinite(gen).all()
    assert not torch.allclose(gen[:, :, n:], free[:, :, n:])
    with pytest.raises(ModelError, match=r"context_guidance = -1.0: expected a finite number >= 0"):
        dit.sample((1, 4, CHUNK, 4, 4), context=context, context_guidance=-1.0)
    with pytest.raises(ConfigError, match=r"config key 'context_guidance' = -1.0: expected a finite number >= 0"):
        compose("sample", ["stage2=x", "context_guidance=-1"])
    with pytest.raises(ConfigError, match=r"'context_guidance' = 2.0: expected 0 without num_frames"):
        compose("sample", ["stage2=x", "context_guidance=2"])  # a short sample has no context: not silently ignored
    assert compose("sample", ["stage2=x", "num_frames=49", "context_guidance=2"]).context_guidance == 2.0


def test_streamed_decoding_equals_one_shot_and_windows_stay_bounded() -> None:
    ae = _ae()
    z = torch.randn(1, 4, 13, 4, 4, generator=torch.Generator().manual_seed(0))
    pieces = [z[:, :, :5], z[:, :, 5:8], z[:, :, 8:11], z[:, :, 11:]]
    with torch.no_grad(), torch_threads(1):  # bitwise equality across window lengths
        whole = ae.denoise(z)
        streamed = torch.cat(list(decode_stream(lambda w, _: ae.denoise(w), iter(pieces), 13, S_T)), dim=2)
    assert torch.equal(streamed, whole)  # windows cover all history: causality keeps kept frames bitwise equal
    seen = []
    frames = list(decode_stream(lambda w, _: seen.append(w.shape[2]) or ae.denoise(w), iter(pieces), 2, S_T))
    assert seen == [5, 5, 5, 4] and sum(f.shape[2] for f in frames) == 1 + 12 * S_T


def test_windows_of_the_measured_reach_decode_like_the_whole_movie_and_shorter_ones_do_not() -> None:
    """``latent_reach``: a window with ``reach + 1`` latent frames before its kept ones gives the whole movie's
    signal estimate (to the reach's tolerance); half that context leaves the window start visible. The sample
    job's default decode context is ``reach + 1``. One thread: the blank-input UNet head normalises a constant
    field first, which turns the rounding differences of multi-threaded kernels on different frame counts into
    output differences of this random-weight model (~10%), whatever the window."""
    ae = _ae()
    with torch.no_grad(), torch_threads(1):
        reach = ae.latent_reach()
        assert reach is not None and 2 <= reach < REACH_LIMIT  # a trained-like head (weights on its output layer)
        z = torch.randn(1, 4, 1 + 4 * reach, 4, 4, generator=torch.Generator().manual_seed(0))
        pieces = [z[:, :, :CHUNK]] + list(torch.split(z[:, :, CHUNK:], 3, dim=2))
        whole = ae.denoise(z)
        errors = {d: (torch.cat(list(decode_stream(lambda w, _: ae.denoise(w), iter(pieces), d, S_T)), dim=2)
                      - whole).abs().max().item() for d in (reach + 1, max(1, reach // 2))}
        start_effect = (ae.denoise(z[:, :, 1:])[:, :, 1:] - whole[:, :, 1 + S_T:]).abs().max().item()  # a window start
    assert errors[reach + 1] <= 2 * REACH_TOL * start_effect, (errors, start_effect)
    assert errors[max(1, reach // 2)] > 10 * errors[reach + 1], errors
    assert plan_long_movie(49, None, None, CHUNK, S_T, reach).decode_context == reach + 1
    assert plan_long_movie(49, None, 3, CHUNK, S_T, reach).decode_context == 3  # the key still overrides
    assert plan_long_movie(49, None, None, CHUNK, S_T, None).decode_context == CHUNK // 2  # unknown: the DiT's context


def test_latent_reach_of_an_untrained_decoder_and_past_the_probe() -> None:
    """Zero-initialized output layers ignore their inputs (reach 0); a start effect that lasts as long as the probe
    has no bound (None)."""
    torch.manual_seed(0)
    assert build_model(compose("train_ae", ["experiment=ae_tiny", *MEAN_FLOW]).model).latent_reach() == 0
    with torch_threads(1):
        assert _ae().latent_reach(limit=3) is None  # it reaches 12 (test above)


def test_window_generators_are_pure_and_distinct() -> None:
    draw = [torch.randn(3, generator=window_generator(0, i, w)) for i, w in ((0, 0), (0, 1), (1, 0), (0, 0))]
    assert torch.equal(draw[0], draw[3]) and not torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def _sample(stage2: Path, out: Path, *extra: str):
    from cadiff.inference.sample import run_sample

    return run_sample(compose("sample", [f"stage2={stage2}", f"out={out}", "num_samples=1", "latent_steps=2",
                                         "decoder_steps=1", "seed=3", *extra]))


def test_sample_num_frames_writes_exact_length_reproducibly(exports: Path, tmp_path: Path) -> None:
    n = 1 + 20 * S_T
    summary, _ = _sample(exports, tmp_path / "a", f"num_frames={n}", "context_frames=2")
    movie = tifffile.imread(tmp_path / "a" / "sample_000.tif")
    assert movie.shape == (n, 32, 32) and movie.dtype.name == "uint16"
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["long_movie"]["chunks"] == 1 + 16 // 3 + 1 and f"{n}x32x32" in summary
    plan = record["long_movie"]  # the default decoder windows: one frame past the measured reach
    assert plan["decoder_reach"] is not None and plan["decode_context"] == max(2, plan["decoder_reach"] + 1), plan
    _sample(exports, tmp_path / "b", f"num_frames={n}", "context_frames=2")
    assert (movie == tifffile.imread(tmp_path / "b" / "sample_000.tif")).all()
    short = tmp_path / "short"
    _sample(exports, short, "num_frames=17")  # the training length: a single chunk and window
    assert tifffile.imread(short / "sample_000.tif").shape == (17, 32, 32)


@pytest.mark.parametrize("fault", [MemoryError, KeyboardInterrupt])
def test_fault_mid_stream_leaves_no_output(exports: Path, tmp_path: Path, monkeypatch, fault) -> None:
    import cadiff.inference.sample as sample

    real = sample.stream_sample

    def failing(*args, **kwargs):
        stream = real(*args, **kwargs)
        yield next(stream)
        raise fault("injected")

    monkeypatch.setattr(sample, "stream_sample", failing)
    out = tmp_path / "out"
    with pytest.raises(fault, match="injected"):
        _sample(exports, out, f"num_frames={1 + 12 * S_T}")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_invalid_num_frames_fails_before_any_output(exports: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=r"'num_frames' = 50: .*nearest valid: 49 or 53"):
        _sample(exports, out, "num_frames=50")
    assert not out.exists()
