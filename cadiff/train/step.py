"""``train_step``: one optimizer step under any Strategy - the one step protocol of the loop, the benchmarks
and the tests.

A step is ``strategy.grad_accum`` micro-batches, each an accumulation context + autocast forward of the
strategy's model (which returns ``(loss, parts)``) and a backward, then ``clip_and_step`` (LR schedule,
clipping, optimizer) and, when due, an EMA update of the strategy's tracked tensors. The step issues no host
sync itself: loss and gradient norm stay 0-d tensors on the device until a caller reads them (the loop does on
log steps only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StepResult:
    """What one step did: mean micro-batch loss and pre-clip gradient norm (detached 0-d tensors: ``float()``
    them when needed), samples seen, seconds waiting for data."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    samples: int
    data_wait_s: float


def train_step(strategy: Any, batches: Iterator[torch.Tensor] | Callable[[int], torch.Tensor], step: int,
               ema: Any = None, ema_every: int = 1, **loss_kwargs: Any) -> StepResult:
    """Run 0-based optimizer step ``step``; ``batches`` is an iterator or ``micro -> batch``.

    ``loss_kwargs`` go to the model's forward (e.g. ``generator=`` for a seeded noise stream). The EMA is
    updated after the optimizer step when ``(step + 1) % ema_every == 0``, with the 1-based step count.
    """
    wait = 0.0
    samples = 0
    loss_sum: torch.Tensor | float = 0.0
    for micro in range(strategy.grad_accum):
        t0 = time.perf_counter()
        x = batches(micro) if callable(batches) else next(batches)
        wait += time.perf_counter() - t0
        x = x.to(strategy.device, non_blocking=True)
        with strategy.accumulation_context(micro == strategy.grad_accum - 1), strategy.autocast():
            loss, _parts = strategy.model(x, **loss_kwargs)
        strategy.backward(loss)
        loss_sum = loss_sum + loss.detach()
        samples += int(x.shape[0])
    grad_norm = strategy.clip_and_step(step)
    if ema is not None and (step + 1) % ema_every == 0:
        ema.update(strategy.ema_tensors(), step + 1)
    return StepResult(loss=loss_sum / strategy.grad_accum, grad_norm=grad_norm, samples=samples, data_wait_s=wait)
