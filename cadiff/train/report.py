"""The run report: ``report.html`` in a training run folder, rewritten by rank 0 after checkpoints.

It shows the training and validation curves of ``metrics.jsonl``, the stage-1 latent-use telemetry (the val
loss with each clip's own latent and with another clip's, and its profile over the flow time, i.e. the noise
level), the latest preview stills of ``media/`` and the resolved config of the latest session. Everything is
read from the run folder, so a finished or interrupted run's report can be rebuilt with
:func:`write_run_report`. The page is one self-contained file (:mod:`cadiff.report_html`), written atomically.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import yaml

from cadiff.errors import DataError
from cadiff.io import read_jsonl
from cadiff.report_html import CurvePanel, Document, Series, curve_grid, figure_png
from cadiff.train.media import RECON_PREFIX, SAMPLES_PREFIX

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# A report costs ~1 CPU-second (matplotlib): written at a checkpoint once per this many seconds, and at the end.
REPORT_MIN_INTERVAL_S = 30.0

# (title, y label, metric keys, log y, reference line)
TRAINING_CURVES = (
    ("loss", "loss", ("loss", "val_loss"), True, None),
    ("gradient norm (before clipping)", "L2 norm", ("grad_norm",), True, None),
    ("learning rate", "lr", ("lr",), False, None),
    ("throughput", "samples/s (all workers)", ("samples_per_s",), False, None),
    ("model FLOP utilisation", "MFU", ("mfu",), False, None),
    ("data wait", "fraction of step time", ("data_wait_frac",), False, None),
)
LATENT_CURVES = (
    ("latent use: loss(own z) / loss(shuffled z)", "ratio (1 = latent ignored)", ("val_latent_use",), False, 1.0),
    ("decoder val loss with own / shuffled latent", "val loss", ("val_loss_z", "val_loss_shuffled_z"), True, None),
)
LABELS = {"loss": "train (window mean)", "val_loss": "val (EMA weights, fixed noise)", "val_loss_z": "own latent",
          "val_loss_shuffled_z": "shuffled latent"}
SUMMARY_KEYS = ("loss", "val_loss", "val_latent_use", "grad_norm", "samples_per_s", "mfu")
PREVIEWS = (
    (RECON_PREFIX, "Reconstructions of fixed validation clips by the EMA weights"),
    (SAMPLES_PREFIX, "Samples of the EMA weights, decoded by the stage-1 export"),
)
# per-flow-time probe losses: val_loss_z_t10 .. val_loss_shuffled_z_t90 (cadiff.models.autoencoder)
_FLOW_TIME_KEY = re.compile(r"^val_(loss_z|loss_shuffled_z)_t(\d+)$")


class RunReport:
    """Rank 0's report writer: refreshes report.html at a checkpoint once the session has run ``min_interval_s``
    seconds, then at most every ``min_interval_s`` seconds, and always at the session's end, so frequent
    checkpoints of fast steps (and short runs) do not pay for it each time."""

    def __init__(self, run_dir: Path, job: str, min_interval_s: float = REPORT_MIN_INTERVAL_S) -> None:
        self.run_dir, self.job, self.min_interval_s = Path(run_dir), job, min_interval_s
        self.last_write = time.monotonic()  # the session's start: its first report is due one interval later

    def refresh(self, step: int, last: bool = False) -> None:
        """Rewrite the report when due; a failure is logged, never raised (a report must not stop training)."""
        if not last and time.monotonic() - self.last_write < self.min_interval_s:
            return
        try:
            write_run_report(self.run_dir, self.job)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s not refreshed at step %d: %s", self.run_dir / REPORT_NAME, step, exc)
        self.last_write = time.monotonic()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` ([] before the first log line; a torn last line is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        records = read_jsonl(path)
    except ValueError as exc:
        raise DataError(f"{path}: a line before the last is not JSON ({exc}); expected one JSON object per line") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {number} is {type(record).__name__} {record!r:.60}; expected a JSON object")
    return records


def latest_config(run_dir: Path) -> tuple[str, str]:
    """(file name, text) of the latest session's recorded config (``config.yaml``, ``config.<n>.yaml``)."""
    def session(path: Path) -> int:
        middle = path.name[len("config."):-len(".yaml")]
        return int(middle) if middle.isdigit() else 0

    configs = sorted(run_dir.glob("config*.yaml"), key=session)
    if not configs:
        return "config.yaml", "(not recorded yet)"
    return configs[-1].name, configs[-1].read_text()


def write_run_report(run_dir: str | Path, job: str) -> Path:
    """Build ``<run_dir>/report.html`` from the run folder; returns its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    config_name, config_text = latest_config(run_dir)
    doc = Document(f"cadiff {job}: run {run_dir.name}")
    doc.table(["summary", "latest"], _summary_rows(run_dir, records, config_text))
    doc.heading("Training curves")
    _curve_section(doc, records, TRAINING_CURVES, "training curves")
    if any("val_latent_use" in r or "val_loss_z" in r for r in records):
        doc.heading("Latent use and noise level")
        doc.paragraph("Stage-1 telemetry at every validation: the decoder's loss with each validation clip's own "
                      "latent and with another clip's. A ratio near 1 means the decoder ignores its latent. The "
                      "last panel shows the same losses per flow time t (0 = data, 1 = pure noise).")
        _curve_section(doc, records, LATENT_CURVES, "latent use", extra=_flow_time_panel(records))
    doc.heading("Previews")
    _preview_section(doc, run_dir / "media")
    doc.heading(f"Resolved config ({config_name})")
    doc.code(config_text.rstrip())
    return doc.write_html(run_dir / REPORT_NAME)


def _summary_rows(run_dir: Path, records: list[dict[str, Any]], config_text: str) -> list[list[str]]:
    last: dict[str, Any] = {}
    for record in records:
        last.update(record)
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        config = None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    max_steps = trainer.get("max_steps", "?") if isinstance(trainer, dict) else "?"
    rows = [["run folder", f"`{run_dir}`"], ["step", f"{last.get('step', 0)} of {max_steps}"]]
    rows += [[key, _fmt(last[key])] for key in SUMMARY_KEYS if key in last]
    rows.append(["export", "written" if (run_dir / "export" / "model.pt").is_file() else "not yet (written at the end)"])
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _series(records: list[dict[str, Any]], key: str) -> Series:
    points = [(r.get("step"), r[key]) for r in records if key in r]
    return Series(LABELS.get(key, key), [p[0] for p in points], [p[1] for p in points], "-" if len(points) > 1 else "o")


def _curve_section(doc: Document, records: list[dict[str, Any]], table: tuple, alt: str,
                   extra: CurvePanel | None = None) -> None:
    panels = [CurvePanel(title, [_series(records, k) for k in keys if any(k in r for r in records)], ylabel=ylabel,
                         log_y=log_y, reference=reference)
              for title, ylabel, keys, log_y, reference in table]
    panels = [p for p in panels if p.series] + ([extra] if extra else [])
    if not panels:
        doc.paragraph("No metrics logged yet (`metrics.jsonl` is written every `trainer.log_every` steps).")
        return
    doc.figure(figure_png(curve_grid(panels)), alt)


def _flow_time_panel(records: list[dict[str, Any]]) -> CurvePanel | None:
    """Probe losses over flow time at the first and the latest validation that logged them."""
    logged = [r for r in records if any(_FLOW_TIME_KEY.match(k) for k in r)]
    if not logged:
        return None
    picks = [(logged[-1], "o-")] + ([(logged[0], "o:")] if len(logged) > 1 else [])
    series = []
    for record, style in picks:
        for which in ("loss_z", "loss_shuffled_z"):
            points = sorted((int(m.group(2)) / 100, v) for k, v in record.items()
                            if (m := _FLOW_TIME_KEY.match(k)) and m.group(1) == which)
            label = f"{LABELS['val_' + which]}, step {record.get('step', '?')}"
            series.append(Series(label, [p[0] for p in points], [p[1] for p in points], style))
    return CurvePanel("decoder val loss over noise level", series, xlabel="flow time t (0 = data, 1 = noise)",
                      ylabel="val loss", log_y=True)


def _preview_section(doc: Document, media_dir: Path) -> None:
    shown = False
    for prefix, caption in PREVIEWS:
        stills = sorted(media_dir.glob(f"{prefix}*.png"))
        if stills:
            step = stills[-1].stem[len(prefix):].lstrip("0") or "0"
            doc.figure(stills[-1].read_bytes(), stills[-1].name,
                       caption=f"{caption}, step {step} (media/{stills[-1].name}; videos beside it).")
            shown = True
    if not shown:
        doc.paragraph("No preview yet: previews are written every `trainer.media_every` steps (0: at the end).")
