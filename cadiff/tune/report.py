"""A sweep's pictures and report: ``metric_vs_params.png`` (one panel per swept parameter, in a grid of at
most :data:`PLOT_COLUMNS` columns, log axes with few, rotated labels) and ``report.html`` (results table, that
figure, every trial's curves from its own metrics.jsonl and the best config), written atomically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib import ticker
from matplotlib.figure import Figure

from cadiff.report_html import (
    CurvePanel,
    Document,
    Series,
    curve_grid,
    figure_png,
    log_scale,
    panel_axes,
    save_png,
)
from cadiff.train.report import read_metrics
from cadiff.tune.space import Param

PLOT_COLUMNS = 3
PLOT_NAME, REPORT_NAME = "metric_vs_params.png", "report.html"
# Per-trial curves: the sweep metric, the score, the validation and the training loss, when the trials logged them
CURVE_KEYS = ("score", "val_loss", "loss")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_metric_vs_params(rows: Sequence[dict[str, Any]], params: dict[str, Param], metric: str,
                          best: dict[str, Any] | None = None) -> Figure:
    """``metric`` against each swept parameter, one panel each; the best trial is marked."""
    fig, axes = panel_axes(len(params), PLOT_COLUMNS)
    for ax, key in zip(axes, params):
        numeric = all(_is_number(r[key]) for r in rows)
        xs = [r[key] if numeric else str(r[key]) for r in rows]
        ax.scatter(xs, [r[metric] for r in rows], color="tab:blue", label="trials")
        if best is not None:
            ax.scatter([best[key] if numeric else str(best[key])], [best[metric]], marker="*", s=160,
                       color="tab:red", label="best")
        if numeric and params[key].dist == "loguniform" and min(xs) > 0:
            log_scale(ax, "x")
        elif numeric:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set(title=key, xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
    if best is not None and axes:
        axes[0].legend(fontsize=8)
    return fig


def trial_label(row: dict[str, Any], params: Sequence[str]) -> str:
    """``lr=0.001 depth=4``: the trial's values under their last key component."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={fmt_value(row[key])}" for key in params)


def fmt_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, a missing value as ``-``."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def column_names(keys: Sequence[str], params: Sequence[str]) -> dict[str, str]:
    """Table headers: each swept key by its last component (``lr``), or the whole key when two share it."""
    last = [key.rsplit(".", 1)[-1] for key in params]
    short = {key: name if last.count(name) == 1 and name not in keys else key for key, name in zip(params, last)}
    return {key: short.get(key, key) for key in keys}


def trial_curves(rows: Sequence[dict[str, Any]], records: dict[str, list[dict[str, Any]]],
                 metric: str) -> list[CurvePanel]:
    """One panel per curve key (the sweep metric first), one line per trial that logged it, labelled with the
    trial's name (``t03``, as in the report's table)."""
    panels = []
    for key in dict.fromkeys((metric, *CURVE_KEYS)):
        series = []
        for row in rows:
            points = [(r.get("step"), r[key]) for r in records.get(row["trial"], []) if key in r]
            if points:
                series.append(Series(str(row["trial"]), [p[0] for p in points], [p[1] for p in points],
                                     "o-" if len(points) < 20 else "-"))
        if series:
            panels.append(CurvePanel(f"{key} per trial", series, ylabel=key, log_y=True))
    return panels


def trial_records(trials: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Each trial's metrics.jsonl records by trial name ([] when its run folder holds none)."""
    return {name: read_metrics(run_dir) for name, run_dir in trials.items()}


def write_sweep_report(sweep_dir: Path, rows: Sequence[dict[str, Any]], params: dict[str, Param], metric: str,
                       mode: str, best: dict[str, Any], best_yaml: str, trials: dict[str, Path],
                       about: Sequence[str] = ()) -> Path:
    """Write ``metric_vs_params.png`` and ``report.html`` into ``sweep_dir``; returns the report's path.

    ``rows``: the results table (``trial``, ``status``, the params, ``metric``, ...); ``trials``: trial name ->
    its training run folder; ``about``: extra lines for the page's header list.
    """
    scored = [r for r in rows if _is_number(r.get(metric)) and math.isfinite(r[metric])]
    plot = save_png(plot_metric_vs_params(scored, params, metric, best), sweep_dir / PLOT_NAME)
    stopped = sum(bool(r.get("early_stopped")) for r in rows)
    failed = sum(r.get("status") == "error" for r in rows)
    doc = Document(f"cadiff sweep {sweep_dir.name}")
    doc.bullets([*about, f"metric: `{metric}` ({mode}); {len(rows)} trials, {stopped} stopped early, {failed} failed",
                 f"best: **{metric}={fmt_value(best[metric])}** with {trial_label(best, list(params))} (trial `{best['trial']}`)"])
    doc.heading("Results")
    keys = list(rows[0]) if rows else []
    headers = column_names(keys, list(params))
    doc.table(["#", *(headers[k] for k in keys)],
              [[str(number), *(fmt_value(r[k]) for k in keys)] for number, r in enumerate(rows, 1)])
    doc.heading("Metric against each parameter").figure(plot, "metric vs params", filename=PLOT_NAME)
    doc.heading("Per-trial curves")
    panels = trial_curves(rows, trial_records(trials), metric)
    if panels:
        doc.figure(figure_png(curve_grid(panels, columns=2)), "per-trial curves",
                   caption="One line per trial, labelled with its trial name in the results table.")
    else:
        doc.paragraph("No trial left a metrics.jsonl to plot.")
    doc.heading("Best config (best.yaml)").code(best_yaml.rstrip())
    return doc.write_html(sweep_dir / REPORT_NAME)
