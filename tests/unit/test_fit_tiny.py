"""Tiny models learn: a DiffAE fits one simulated clip and a DiT fits one latent on CPU in well under 60 s."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cadiff.config import compose
from cadiff.data.simulate import simulate_movie
from cadiff.models.registry import build_model

torch.set_num_threads(1)


def _fit(model: torch.nn.Module, batch: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss, _ = model.training_loss(batch, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_tiny_diffae_fits_one_simulated_clip() -> None:
    movie, _ = simulate_movie(frames=9, height=32, width=32, seed=0)
    photons = (movie.data.astype(np.float32) - movie.offset) / movie.gain
    clip = torch.from_numpy((photons - photons.mean()) / photons.std())[None, None]  # [1, 1, 9, 32, 32]
    torch.manual_seed(0)
    # memory is no concern at this size: store activations rather than recompute them (faster)
    model = build_model(compose("train_ae", ["experiment=ae_tiny", "model.recompute_elementwise=false"]).model)
    losses = _fit(model, clip.expand(2, -1, -1, -1, -1).contiguous(), steps=120, lr=4e-3)
    initial, final = np.mean(losses[:10]), np.mean(losses[-20:])
    assert final < 0.5 * initial, (initial, final)
    model.eval()
    recon = model.reconstruct(clip, num_steps=8, generator=torch.Generator().manual_seed(1))
    assert recon.shape == clip.shape
    corr = np.corrcoef(clip[0, 0].mean(0).flatten().numpy(), recon[0, 0].mean(0).flatten().numpy())[0, 1]
    assert corr > 0.9, f"temporal-mean correlation {corr:.3f}"


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
