"""DiT: zero output at init, bounded QK-normalized logits, RoPE relativity, size registry, stage-2 wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from cadiff.config import DIT_SIZES, compose
from cadiff.errors import ConfigError, ModelError
from cadiff.models.dit import DiT, LatentDiffusion
from cadiff.models.layers import Attention, grid_coords, rope_angles
from cadiff.models.registry import build_model


def _tiny_cfg(**extra):
    cfg = compose("train_latent", ["experiment=dit_tiny", "model.in_channels=4"]).model
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def test_output_is_exactly_zero_at_init() -> None:
    torch.manual_seed(0)
    dit = DiT(4, 64, 2, 4, patch_size=(1, 2, 2), cond_dim=3)
    x = 10 * torch.randn(2, 4, 5, 8, 8)
    out = dit(x, torch.rand(2), cond=torch.randn(2, 3))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


@torch.no_grad()
def test_qk_norm_keeps_logits_bounded_for_large_inputs() -> None:
    torch.manual_seed(0)
    head_dim = 16
    normed, raw = Attention(64, 4, qk_norm=True), Attention(64, 4, qk_norm=False)
    raw.load_state_dict(normed.state_dict(), strict=False)
    rope = rope_angles(grid_coords(2, 3, 3), head_dim)
    for scale in (1.0, 1e3, 1e6):
        x = scale * torch.randn(2, 18, 64)
        # |q.k| / sqrt(d) <= |q| |k| / sqrt(d) = sqrt(d) for RMS-normalized q, k (unit gains at init)
        assert float(normed.scores(x, rope).abs().max()) <= math.sqrt(head_dim) * (1 + 1e-4)
    assert float(raw.scores(1e3 * torch.randn(2, 18, 64), rope).abs().max()) > 1e4  # why QK-norm is needed


@torch.no_grad()
def test_dit_attention_scores_are_shift_invariant_under_rope() -> None:
    torch.manual_seed(0)
    attn = DiT(4, 48, 1, 2).blocks[0].attn
    x = torch.randn(1, 24, 48, dtype=torch.float64)
    attn = attn.double()
    coords = grid_coords(2, 3, 4)
    base = attn.scores(x, rope_angles(coords, 24, dtype=torch.float64))
    shifted = attn.scores(x, rope_angles(coords + torch.tensor([7, 3, 11]), 24, dtype=torch.float64))
    assert torch.allclose(base, shifted, atol=1e-9)


def test_unpatchify_inverts_patchify_for_3d_patches() -> None:
    dit = DiT(3, 48, 1, 2, patch_size=(2, 2, 4))
    x = torch.randn(2, 3, 4, 6, 8)
    grid = dit.token_grid(tuple(x.shape[1:]))
    assert grid == (2, 3, 2)
    # patchify by hand into [B, N, pt*ph*pw*C] with channels last, raster order (t slowest)
    patches = x.reshape(2, 3, 2, 2, 3, 2, 2, 4).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(2, 12, 2 * 2 * 4 * 3)
    assert torch.equal(dit.unpatchify(patches, grid), x)


def test_bad_latent_shapes_raise_model_error() -> None:
    dit = DiT(4, 64, 1, 4, patch_size=(1, 2, 2))
    with pytest.raises(ModelError, match="patch_size"):
        dit(torch.randn(1, 4, 5, 7, 8), torch.rand(1))
    with pytest.raises(ModelError, match="C=4"):
        dit(torch.randn(1, 3, 5, 8, 8), torch.rand(1))
    with pytest.raises(ModelError, match="cond_dim=0"):
        dit(torch.randn(1, 4, 5, 8, 8), torch.rand(1), cond=torch.randn(1, 2))


def test_size_registry_matches_the_dit_paper() -> None:
    assert DIT_SIZES["S"] == (384, 12, 6) and DIT_SIZES["B"] == (768, 12, 12)
    assert DIT_SIZES["L"] == (1024, 24, 16) and DIT_SIZES["XL"] == (1152, 28, 16)
    # DiT Table 1 parameter counts; ours lack the class embedding and learn no sigma, so within 3%
    paper = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}
    for size, expected in paper.items():
        with torch.device("meta"):
            model = build_model(_tiny_cfg(size=size))
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - expected) / expected < 0.03, (size, count)


def test_latent_diffusion_api_and_conditioning() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(cond_dim=3))
    assert isinstance(model, LatentDiffusion) and model.model_config["in_channels"] == 4
    assert len(model.shard_units()) == 2
    z = torch.randn(2, 4, 5, 8, 8)
    cond = torch.randn(2, 3)
    loss, metrics = model.training_loss(z, torch.Generator().manual_seed(0), cond=cond)
    assert loss.dim() == 0 and float(metrics["loss"]) == pytest.approx(float(loss.detach()))
    assert not metrics["loss"].requires_grad and metrics["loss"].dim() == 0
    loss.backward()
    # adaLN-Zero: the zeroed final projection still receives gradient, so the model can leave zero
    assert model.dit.final_layer.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out_a = model.dit(z, torch.full((2,), 0.5), cond)
    out_b = model.dit(z, torch.full((2,), 0.5), cond + 1)
    assert not torch.allclose(out_a, out_b), "the conditioning vector must reach the output through adaLN"
    s1 = model.sample((2, 4, 5, 8, 8), num_steps=3, generator=torch.Generator().manual_seed(1), cond=cond)
    assert s1.shape == (2, 4, 5, 8, 8) and model.last_nfe == 3
    s2 = model.sample((2, 4, 5, 8, 8), num_steps=3, generator=torch.Generator().manual_seed(1), cond=cond)
    assert torch.equal(s1, s2)
    assert model.sample((1, 4, 5, 8, 8)).shape == (1, 4, 5, 8, 8) and model.last_nfe == 8  # dit_tiny: 8 steps


def test_flops_per_sample_counts_matmuls_and_attention() -> None:
    model = build_model(_tiny_cfg())
    d, depth, n = 64, 2, 5 * 4 * 4  # tokens of a [4, 5, 8, 8] latent with 1x2x2 patches
    flops = model.flops_per_sample((4, 5, 8, 8))
    per_block = 2 * n * (4 * d * d + 2 * 4 * d * d) + 4 * n * n * d  # qkv+proj, MLP (ratio 4), QK^T and AV
    assert per_block * depth < flops < 1.2 * per_block * depth + 2 * n * 16 * d * 2


def test_registry_requires_latent_channels() -> None:
    cfg = compose("train_latent", ["experiment=dit_tiny"]).model
    with pytest.raises(ConfigError, match="in_channels"):
        build_model(cfg)
