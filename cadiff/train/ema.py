"""Exponential moving average of parameters, held as a dict ``name -> tensor`` beside the live tensors.

The EMA never looks at a module: it is given live tensor references by name. The training code hands it
whatever the strategy exposes on this rank - full parameters (single/DDP), FSDP2 local shards, or DeepSpeed
ZeRO-3 partitions - and the shadow copies have exactly those shapes, so each rank averages its own piece and
checkpoints shard the same way. Decay is constant or follows the power-function profile of Karras et al.
2024 (EDM2, arXiv:2312.02696, eq. 3): ``beta_n = (1 - 1/n)^(gamma + 1)`` capped at ``decay``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from cadiff.errors import CheckpointError, ModelError


class EMA:
    """EMA of named tensors: ``ema <- beta ema + (1 - beta) live`` after each optimizer step."""

    def __init__(self, named_tensors: dict[str, Tensor], decay: float, warmup_power: float | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ModelError(f"EMA decay {decay}: expected a value in [0, 1)")
        if warmup_power is not None and warmup_power < 0:
            raise ModelError(f"EMA warmup_power {warmup_power}: expected >= 0 (EDM2 gamma) or None")
        self.decay = float(decay)
        self.warmup_power = warmup_power
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in named_tensors.items()}

    def decay_at(self, step: int) -> float:
        """Decay used after optimizer step ``step`` (1-based): constant, or ``min(decay, (1 - 1/step)^(gamma+1))``."""
        if self.warmup_power is None:
            return self.decay
        if step <= 1:
            return 0.0
        return min(self.decay, (1.0 - 1.0 / step) ** (self.warmup_power + 1.0))

    def _match(self, named_tensors: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if named_tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - named_tensors.keys())
            extra = sorted(named_tensors.keys() - self.shadow.keys())
            raise ModelError(f"EMA tensors differ from the live ones: missing {missing[:5]}, unexpected {extra[:5]}")
        names = list(self.shadow)
        live = [named_tensors[k] for k in names]
        for name, t in zip(names, live):
            if t.shape != self.shadow[name].shape:
                raise ModelError(f"EMA tensor '{name}': shape {tuple(self.shadow[name].shape)} != live "
                                 f"{tuple(t.shape)}")
        return [self.shadow[k] for k in names], live

    @torch.no_grad()
    def update(self, named_tensors: dict[str, Tensor], step: int) -> float:
        """Fold the live tensors into the average after optimizer step ``step``; returns the decay used."""
        beta = self.decay_at(step)
        shadow, live = self._match(named_tensors)
        live = [t.detach().to(s.dtype) for s, t in zip(shadow, live)]
        torch._foreach_lerp_(shadow, live, 1.0 - beta)
        self.num_updates += 1
        return beta

    @torch.no_grad()
    def copy_to(self, named_tensors: dict[str, Tensor]) -> None:
        """Overwrite the live tensors with the EMA values (e.g. before exporting inference weights)."""
        shadow, live = self._match(named_tensors)
        for s, t in zip(shadow, live):
            t.copy_(s)

    @contextmanager
    def swap(self, named_tensors: dict[str, Tensor]) -> Iterator[None]:
        """Evaluate with EMA weights inside the block; the training weights are restored bit-exactly on exit.

        The upstream restore copied the live (EMA) values back into the backup; here the backup is a private
        clone taken before the copy, and it is what flows back into the live tensors, even on exceptions.
        """
        _, live = self._match(named_tensors)
        with torch.no_grad():
            backup = [t.detach().clone() for t in live]
        self.copy_to(named_tensors)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(live, backup):
                    t.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """Shadow tensors and schedule state (tensors are shared, copy them if you keep training)."""
        return {"decay": self.decay, "warmup_power": self.warmup_power, "num_updates": self.num_updates,
                "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; names and shapes must match the tensors this EMA was built on."""
        try:
            shadow = state["shadow"]
        except (KeyError, TypeError):
            raise CheckpointError("EMA state: expected a dict with key 'shadow' (from EMA.state_dict())") from None
        if shadow.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - shadow.keys())
            extra = sorted(shadow.keys() - self.shadow.keys())
            raise CheckpointError(f"EMA state: missing tensors {missing[:5]}, unexpected {extra[:5]}")
        for name, value in shadow.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise CheckpointError(f"EMA state tensor '{name}': shape {tuple(value.shape)}, expected "
                                      f"{tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.decay = float(state.get("decay", self.decay))
        self.warmup_power = state.get("warmup_power", self.warmup_power)
        self.num_updates = int(state.get("num_updates", 0))
