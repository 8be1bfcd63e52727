"""The sweep's trial table: one line per Tune trial (status, sampled values, step, metric), logged every
``status_every_s`` seconds while trials run, a line when a trial ends, and the full table at the end.

Tune's own console reporter is off (``verbose=0``): it prints a result table per trial event and a status
block every 30 s whatever the sweep's size, while trial workers already print their progress lines.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def best_trial(trials: list[Any], metric: str, mode: str) -> Any | None:
    """The trial whose last result holds the best finite ``metric`` (None when none reported it)."""
    scored = [t for t in trials if isinstance((t.last_result or {}).get(metric), (int, float))
              and math.isfinite(t.last_result[metric])]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.last_result[metric])


def trial_table(trials: list[Any], params: list[str], metric: str, mode: str, elapsed_s: float) -> list[str]:
    """A summary line (status counts, best trial) and one aligned row per trial."""
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    summary = f"sweep: {len(trials)} trials after {elapsed_s:.0f}s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    best = best_trial(trials, metric, mode)
    if best is not None:
        summary += f"; best {metric}={best.last_result[metric]:.4g} ({_trial_name(best)})"
    header = ["trial", "status", *params, "step", metric]
    rows = [[_trial_name(t), t.status, *(_cell((t.config or {}).get(p)) for p in params),
             _cell((t.last_result or {}).get("step")), _cell((t.last_result or {}).get(metric))] for t in trials]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [summary] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


class TrialTable(Callback):
    """Tune callback that logs :func:`trial_table` at an interval and a line per finished trial."""

    def __init__(self, params: list[str], metric: str, mode: str, every_s: float) -> None:
        self.params, self.metric, self.mode, self.every_s = params, metric, mode, every_s
        self.start = time.monotonic()
        self.last = self.start

    def setup(self, **info: Any) -> None:
        # a restored sweep unpickles this callback: its clock starts again with the experiment
        self.start = self.last = time.monotonic()

    def _log_table(self, trials: list[Any]) -> None:
        self.last = time.monotonic()
        log.info("%s", "\n".join(trial_table(trials, self.params, self.metric, self.mode, self.last - self.start)))

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self._log_table(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        log.info("sweep: %s finished at step %s, %s=%s", _trial_name(trial), _cell(result.get("step")), self.metric,
                 _cell(result.get(self.metric)))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        log.warning("sweep: %s failed (error file: %s)", _trial_name(trial), getattr(trial, "error_file", None))

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._log_table(trials)
