"""EMA: closed forms, power-function warmup, bit-exact swap/restore, state_dict round trip, live references."""

from __future__ import annotations

import io

import pytest
import torch

from cadiff.errors import CheckpointError, ModelError
from cadiff.train.ema import EMA


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_constant_decay_matches_the_closed_form() -> None:
    live = _params()
    init = {k: v.clone() for k, v in live.items()}
    decay, n = 0.9, 12
    ema = EMA(live, decay)
    history = []
    for step in range(1, n + 1):
        for v in live.values():
            v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(100 + step)) + step)
        history.append({k: v.clone() for k, v in live.items()})
        assert ema.update(live, step) == decay
    for k in live:
        # ema_n = d^n e_0 + (1 - d) sum_i d^(n - i) p_i
        expected = decay**n * init[k] + (1 - decay) * sum(decay ** (n - i) * history[i - 1][k] for i in range(1, n + 1))
        assert torch.allclose(ema.shadow[k], expected, atol=1e-5)
    assert ema.num_updates == n


def test_power_warmup_with_gamma_zero_is_the_running_mean() -> None:
    live = _params()
    ema = EMA(live, decay=0.9999, warmup_power=0.0)
    seen = []
    for step in range(1, 9):
        for v in live.values():
            v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(step)))
        seen.append({k: v.clone() for k, v in live.items()})
        ema.update(live, step)
    for k in live:
        assert torch.allclose(ema.shadow[k], torch.stack([s[k] for s in seen]).mean(0), atol=1e-6)


def test_power_warmup_profile_and_cap() -> None:
    ema = EMA(_params(), decay=0.99, warmup_power=6.94)  # EDM2 sigma_rel ~ 0.05 uses gamma 6.94
    assert ema.decay_at(1) == 0.0
    assert ema.decay_at(10) == pytest.approx((1 - 1 / 10) ** 7.94)
    assert ema.decay_at(10**6) == 0.99
    assert EMA(_params(), 0.5).decay_at(1) == 0.5


def test_swap_uses_ema_inside_and_restores_training_weights_bit_exactly() -> None:
    model = torch.nn.Linear(5, 3)
    ema = EMA(dict(model.named_parameters()), decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3 + 1 / 3)  # values with many significant bits
    ema.update(dict(model.named_parameters()), 1)
    train_bits = {k: v.detach().clone() for k, v in model.named_parameters()}
    ema_bits = {k: v.clone() for k, v in ema.shadow.items()}
    with ema.swap(dict(model.named_parameters())):
        for k, v in model.named_parameters():
            assert torch.equal(v, ema_bits[k])
    for k, v in model.named_parameters():
        assert torch.equal(v, train_bits[k]), f"{k} was not restored"
        assert torch.equal(ema.shadow[k], ema_bits[k]), f"EMA {k} was overwritten by the restore"
    assert model.weight.requires_grad
    with pytest.raises(RuntimeError), ema.swap(dict(model.named_parameters())):
        raise RuntimeError("evaluation failed")
    for k, v in model.named_parameters():
        assert torch.equal(v, train_bits[k])


def test_copy_to_and_live_references_to_shards() -> None:
    # a flat buffer whose chunks stand in for per-rank shards (FSDP2 local shards, ZeRO-3 partitions)
    flat = torch.arange(12, dtype=torch.float32)
    shards = {"shard0": flat[:6], "shard1": flat[6:]}
    ema = EMA(shards, decay=0.0)
    with torch.no_grad():
        flat.mul_(2)
    ema.update(shards, 1)
    assert torch.equal(ema.shadow["shard1"], torch.arange(6, 12, dtype=torch.float32) * 2)
    with torch.no_grad():
        flat.zero_()
    ema.copy_to(shards)
    assert torch.equal(flat, torch.arange(12, dtype=torch.float32) * 2), "copy_to must write through the references"


def test_state_dict_round_trip_and_mismatch_errors() -> None:
    live = _params()
    ema = EMA(live, 0.9, warmup_power=1.0)
    for step in range(1, 4):
        live["w"].add_(1.0)
        ema.update(live, step)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    restored = EMA(_params(1), 0.1)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for k in live:
        assert torch.equal(restored.shadow[k], ema.shadow[k])
    assert (restored.decay, restored.warmup_power, restored.num_updates) == (0.9, 1.0, 3)
    with pytest.raises(CheckpointError, match="missing"):
        restored.load_state_dict({"shadow": {"w": torch.zeros(4, 3)}})
    with pytest.raises(CheckpointError, match="shape"):
        restored.load_state_dict({"shadow": {"w": torch.zeros(4, 3), "b": torch.zeros(2)}})
    with pytest.raises(ModelError, match="missing"):
        ema.update({"w": live["w"]}, 5)
    with pytest.raises(ModelError):
        EMA(live, decay=1.0)
