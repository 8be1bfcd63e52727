"""A training step that is not a log step reads no tensor back to the host (``.item()``, ``float()``, ``int()``,
``.tolist()``) from cadiff code: models return detached tensors, the step and the loop's window sum them on the
device, and only the log step's metrics read them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import cadiff
from cadiff.config import StrategyConfig, TrainerConfig, compose
from cadiff.models.registry import build_model
from cadiff.train.ema import EMA
from cadiff.train.loop import TrainingModule, _window_metrics, accumulate, new_window
from cadiff.train.step import train_step
from cadiff.train.strategies import build_strategy

PACKAGE = str(Path(cadiff.__file__).resolve().parent)
SYNCS = ("item", "__float__", "__int__", "tolist")


@contextmanager
def host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record ``file:line name`` of every tensor-to-host read made directly by cadiff code.

    Reads inside torch itself (e.g. AdamW's CPU step counter) are not ours to remove and are not counted.
    """
    calls: list[str] = []

    def counted(name: str, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                calls.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in SYNCS:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        yield calls


TINY_AE = ["experiment=ae_tiny", "model.base_channels=4", "model.dec_base_channels=4", "model.z_channels=2"]
CASES = {
    "diffae": ("train_ae", [*TINY_AE, "model.noise_std=0.3"], (2, 1, 9, 16, 16)),
    "regression_ae": ("train_ae", [*TINY_AE, "model=regression_ae"], (2, 1, 9, 16, 16)),
    "dit": ("train_latent", ["experiment=dit_tiny", "model.in_channels=4"], (2, 4, 5, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_non_log_step_has_no_host_sync(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    job, overrides, shape = CASES[case]
    torch.manual_seed(0)
    model = build_model(compose(job, overrides).model)
    strategy = build_strategy(StrategyConfig(name="single"), TrainerConfig(max_steps=4, grad_accum=2, grad_clip=1.0))
    strategy.setup(TrainingModule(model), torch.device("cpu"))
    ema = EMA(strategy.ema_tensors(), decay=0.9)
    x, generator, window = torch.randn(shape), torch.Generator().manual_seed(0), new_window()
    accumulate(window, train_step(strategy, lambda micro: x, 0, ema=ema, generator=generator), 0.1)  # warm-up

    with host_syncs(monkeypatch) as calls:
        for step in (1, 2):
            accumulate(window, train_step(strategy, lambda micro: x, step, ema=ema, generator=generator), 0.1)
    assert calls == []

    # the log step reads the window: the counter sees those reads, so an empty count above means something
    with host_syncs(monkeypatch) as calls:
        metrics = _window_metrics(window, 3, torch.device("cpu"), 1.0, 1.0, 1, 1e-3)
    assert any("loop.py" in c for c in calls)
    assert isinstance(metrics["loss"], float) and metrics["loss"] > 0 and metrics["grad_norm"] > 0
