"""Tiny models learn: a DiffAE reconstructs its own simulated clips and a DiT fits one latent, on CPU in < 60 s."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadiff.config import StrategyConfig, TrainerConfig, compose
from cadiff.data.anscombe import anscombe
from cadiff.data.simulate import simulate_movie
from cadiff.models.registry import build_model
from cadiff.train.loop import TrainingModule
from cadiff.train.step import train_step
from cadiff.train.strategies import build_strategy


def _fit(model: torch.nn.Module, batch: torch.Tensor, steps: int, lr: float) -> list[float]:
    """The loop's step (strategy=single) as plain Adam: constant LR, no clipping, no weight decay."""
    trainer = TrainerConfig(max_steps=steps, lr=lr, betas=[0.9, 0.999], warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0)
    strategy = build_strategy(StrategyConfig(name="single"), trainer)
    strategy.setup(TrainingModule(model), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    return [float(train_step(strategy, lambda micro: batch, step, generator=g).loss) for step in range(steps)]


def _anscombe_clips(seeds: list[int]) -> tuple[torch.Tensor, dict]:
    """Simulated 9x32x32 clips normalized as the pipeline does by default (generalized Anscombe, center/scale)."""
    values, read_noise = [], 0.0
    for seed in seeds:
        movie, _ = simulate_movie(frames=9, height=32, width=32, seed=seed)
        read_noise = float(movie.read_noise) / float(movie.gain)
        values.append(anscombe((movie.data.astype(np.float64) - movie.offset) / movie.gain, read_noise))
    stacked = np.stack(values)
    norm = {"kind": "anscombe", "center": float(stacked.mean()), "scale": float(stacked.std())}
    clips = torch.from_numpy(((stacked - norm["center"]) / norm["scale"]).astype(np.float32))[:, None]
    return clips, {**norm, "read_noise_photons": read_noise}


def specificity(recon: torch.Tensor, clips: torch.Tensor) -> float:
    """Mean over clips of corr(recon_i, clip_i) - mean_j!=i corr(recon_i, clip_j): ~0 when z is ignored."""
    n = len(clips)
    r = np.corrcoef(recon.flatten(1).numpy(), clips.flatten(1).numpy())[:n, n:]
    return float(np.mean([r[i, i] - np.mean(np.delete(r[i], i)) for i in range(n)]))


@pytest.mark.slow
def test_tiny_diffae_reconstructs_its_own_clip_not_another() -> None:
    """Shipped defaults (Anscombe data, mean_flow decoder, noise model): the latent carries the clip."""
    clips, noise = _anscombe_clips([0, 1, 2])
    torch.manual_seed(0)
    cfg = compose("train_ae", ["experiment=ae_tiny", "model.recompute_elementwise=false"])
    for key, value in noise.items():
        setattr(cfg.model.noise_model, key, value)
    model = build_model(cfg.model)
    losses = _fit(model, clips, steps=150, lr=4e-3)
    initial, final = np.mean(losses[:10]), np.mean(losses[-20:])
    assert final < 0.7 * initial, (initial, final)
    model.eval()
    g = torch.Generator().manual_seed(1)
    recon = model.reconstruct(clips, generator=g)
    assert recon.shape == clips.shape
    margin = specificity(recon, clips)
    assert margin > 0.2, f"reconstructions barely prefer their own clip: margin {margin:.3f}"
    # the same decoder fed one latent for every clip ignores its input: the check fails for it
    with torch.no_grad():
        z = model.encode(clips).mean(0, keepdim=True).expand(len(clips), -1, -1, -1, -1).contiguous()
        blind = model.decode(z, generator=torch.Generator().manual_seed(1))
    assert specificity(blind, clips) < 0.05
    # and the reconstructions keep shot noise: the noisy decode departs from the signal estimate by about
    # the pixel noise level, while the estimate itself is closer to the input than the noisy decode
    with torch.no_grad():
        estimate = model.denoise(model.encode(clips))
    spread = float((recon - estimate).std())
    assert 0.5 / noise["scale"] < spread < 1.5 / noise["scale"], spread
    assert float((estimate - clips).pow(2).mean()) < float((recon - clips).pow(2).mean())
    with torch.no_grad():
        use = model.validation_losses(clips, torch.Generator().manual_seed(2))["latent_use"]
    assert float(use) < 0.8, f"latent_use {float(use):.3f}: the decoder loss barely depends on the latent"


def test_tiny_dit_fits_one_latent() -> None:
    g = torch.Generator().manual_seed(0)
    latent = torch.nn.functional.avg_pool3d(torch.randn(1, 4, 5, 12, 12, generator=g), (1, 5, 5), stride=1)
    latent = (latent - latent.mean()) / latent.std()  # a smooth [1, 4, 5, 8, 8] latent
    torch.manual_seed(0)
    model = build_model(compose("train_latent", ["experiment=dit_tiny", "model.in_channels=4"]).model)
    losses = _fit(model, latent.expand(8, -1, -1, -1, -1).contiguous(), steps=300, lr=3e-3)
    initial, final = np.mean(losses[:10]), np.mean(losses[-20:])
    assert final < 0.5 * initial, (initial, final)
    samples = model.sample((4, 4, 5, 8, 8), generator=torch.Generator().manual_seed(1))
    corr = np.corrcoef(samples.mean(0).flatten().numpy(), latent.flatten().numpy())[0, 1]
    assert corr > 0.9, f"sample/latent correlation {corr:.3f}"
