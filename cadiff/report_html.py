"""Self-contained reports: a small document model rendered to Markdown or to one HTML file, and its figures.

A :class:`Document` holds headings, text, tables, code and figures; :meth:`Document.html` embeds every figure
as a base64 PNG data URI and carries no script and no external link, so ``report.html`` opens offline and can
be mailed as one file. All text is escaped; inline ``**bold**`` and ```code``` are the only markup. Figures
use matplotlib's object API (``Figure``, Agg) and never touch pyplot state. Training runs, ``evaluate`` and
sweeps build their reports here; this module imports nothing of train/, eval/ or tune/.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from cadiff.io import write_bytes_atomic, write_text_atomic

PNG_DPI = 100
# Percentiles that set an image grid's shared intensity range: robust to a few hot pixels.
GRID_PERCENTILES = (0.5, 99.5)
_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`(.+?)`"), r"<code>\1</code>")]
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.meta { color: #777; font-size: 0.85em; }
"""


def inline_html(text: str) -> str:
    """Escape ``text`` for HTML, then turn ``**bold**`` and ```code``` into tags."""
    out = html.escape(str(text), quote=True)
    for pattern, tag in _INLINE:
        out = pattern.sub(tag, out)
    return out


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass
class Document:
    """An ordered list of blocks, rendered by :meth:`markdown` or :meth:`html`."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> Document:
        self.blocks.append(("heading", (max(2, min(level, 4)), text)))
        return self

    def paragraph(self, text: str) -> Document:
        self.blocks.append(("paragraph", text))
        return self

    def bullets(self, items: Sequence[str]) -> Document:
        self.blocks.append(("bullets", list(items)))
        return self

    def table(self, header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> Document:
        self.blocks.append(("table", ([str(h) for h in header], [[str(c) for c in row] for row in rows])))
        return self

    def code(self, text: str) -> Document:
        self.blocks.append(("code", text))
        return self

    def figure(self, png: bytes, alt: str, filename: str | None = None, caption: str | None = None) -> Document:
        """A PNG figure; Markdown links ``filename`` (written beside it), HTML embeds the bytes."""
        self.blocks.append(("figure", (png, alt, filename, caption)))
        return self

    def markdown(self) -> str:
        parts = [f"# {self.title}"] + [_MARKDOWN[kind](value) for kind, value in self.blocks]
        return "\n\n".join(parts) + "\n"

    def html(self) -> str:
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        body = "\n".join(_HTML[kind](value) for kind, value in self.blocks)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{inline_html(self.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{inline_html(self.title)}</h1>\n<p class=\"meta\">written {stamp} UTC by cadiff</p>\n"
            f"{body}\n</body>\n</html>\n"
        )

    def write_html(self, path: str | Path) -> Path:
        """Write :meth:`html` to ``path`` atomically (temp file, then rename)."""
        write_text_atomic(path, self.html())
        return Path(path)


def _md_table(value: tuple[list[str], list[list[str]]]) -> str:
    header, rows = value
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _md_figure(value: tuple[bytes, str, str | None, str | None]) -> str:
    _png, alt, filename, caption = value
    link = f"![{alt}]({filename})" if filename else f"({alt}: see report.html)"
    return f"{link}\n\n{caption}" if caption else link


_MARKDOWN: dict[str, Callable[[Any], str]] = {
    "heading": lambda v: f"{'#' * v[0]} {v[1]}",
    "paragraph": str,
    "bullets": lambda v: "\n".join(f"- {item}" for item in v),
    "table": _md_table,
    "code": lambda v: f"```\n{v}\n```",
    "figure": _md_figure,
}


def _html_table(value: tuple[list[str], list[list[str]]]) -> str:
    header, rows = value
    head = "".join(f"<th>{inline_html(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _html_figure(value: tuple[bytes, str, str | None, str | None]) -> str:
    png, alt, _filename, caption = value
    img = f"<img src=\"{png_data_uri(png)}\" alt=\"{html.escape(alt, quote=True)}\">"
    cap = f"<figcaption>{inline_html(caption)}</figcaption>" if caption else ""
    return f"<figure>{img}{cap}</figure>"


_HTML: dict[str, Callable[[Any], str]] = {
    "heading": lambda v: f"<h{v[0]}>{inline_html(v[1])}</h{v[0]}>",
    "paragraph": lambda v: f"<p>{inline_html(v)}</p>",
    "bullets": lambda v: "<ul>\n" + "".join(f"<li>{inline_html(item)}</li>\n" for item in v) + "</ul>",
    "table": _html_table,
    "code": lambda v: f"<pre>{html.escape(str(v))}</pre>",
    "figure": _html_figure,
}


# ---------------------------------------------------------------------------------------------------------
# figures


def figure_png(fig: Figure, dpi: int = PNG_DPI, tight: bool = False) -> bytes:
    """A matplotlib Figure as PNG bytes (Agg). ``tight`` crops to the drawn content (one more layout pass:
    the grids below lay themselves out in fixed inches instead, which is several times cheaper)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buffer.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = PNG_DPI, tight: bool = False) -> bytes:
    """Write a Figure as a PNG file atomically; returns the bytes (for embedding)."""
    png = figure_png(fig, dpi, tight)
    write_bytes_atomic(path, png)
    return png


def _fixed_margins(fig: Figure, left: float, right: float, bottom: float, top: float, wspace: float,
                   hspace: float) -> None:
    """Subplot margins in inches (``wspace``/``hspace`` as fractions of a panel), whatever the figure size."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace, hspace=hspace)


def panel_axes(count: int, columns: int, panel_size: tuple[float, float] = (4.4, 3.4)) -> tuple[Figure, list[Any]]:
    """A Figure with ``count`` axes in a grid of at most ``columns`` columns (unused cells hidden); each cell
    leaves room for a title, axis labels and rotated tick labels."""
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows))
    _fixed_margins(fig, left=0.95, right=0.2, bottom=0.7, top=0.4, wspace=0.38, hspace=0.6)
    axes = list(np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


@dataclass(frozen=True)
class Series:
    """One line of a panel: ``ys`` over ``xs`` (non-finite points dropped)."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: str = "-"


@dataclass(frozen=True)
class CurvePanel:
    """One panel of :func:`curve_grid`."""

    title: str
    series: list[Series]
    xlabel: str = "step"
    ylabel: str = ""
    log_y: bool = False
    reference: float | None = None  # a dotted horizontal line (e.g. latent use 1 = latent ignored)


def finite_points(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs where both are finite numbers."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if _is_number(x) and _is_number(y)]
    if not pairs:
        return np.empty(0), np.empty(0)
    arr = np.asarray(pairs)
    return arr[:, 0], arr[:, 1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def log_scale(ax: Any, which: str) -> None:
    """Log scale on axis ``which`` (x | y), called after plotting, with plain-number labels on a few major
    ticks - 1-2-3-5 steps within a decade (or at most 4 even steps where none of those fall inside), 1-2-5 within
    two, else decades - and unlabelled minor ticks: no mathtext (cheaper to draw), no overlapping labels."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    lo, hi = axis.get_data_interval()
    span = hi / lo if lo > 0 and math.isfinite(hi / lo) else math.inf
    subs = (1.0, 2.0, 3.0, 5.0) if span < 10 else (1.0, 2.0, 5.0) if span < 100 else (1.0,)
    locator = ticker.LogLocator(subs=subs, numticks=6)
    if span < 10 and _ticks_inside(lo, hi, subs) < 2:
        locator = ticker.MaxNLocator(nbins=4)  # LogLocator would fall back to its AutoLocator: ~10 crowded ticks
    axis.set_major_locator(locator)
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _pos: f"{value:.3g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _ticks_inside(lo: float, hi: float, subs: Sequence[float]) -> int:
    """How many of the ticks ``s * 10**k`` (s in ``subs``) lie in [lo, hi] (lo > 0)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    return sum(lo <= s * 10.0**d <= hi for d in decades for s in subs)


def curve_grid(panels: Sequence[CurvePanel], columns: int = 3, max_legend: int = 12) -> Figure:
    """Line plots, one panel per :class:`CurvePanel`, in a grid of ``columns``."""
    fig, axes = panel_axes(len(panels), columns)
    for ax, panel in zip(axes, panels):
        drawn = 0
        positive = True
        for series in panel.series:
            xs, ys = finite_points(series.xs, series.ys)
            if xs.size:
                ax.plot(xs, ys, series.style, label=series.label, markersize=3)
                drawn += 1
                positive = positive and bool((ys > 0).all())
        if panel.reference is not None:
            ax.axhline(panel.reference, color="0.5", linestyle=":", linewidth=1)
        if panel.log_y and positive and drawn:
            log_scale(ax, "y")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        if 1 < drawn <= max_legend:
            ax.legend(fontsize=8, ncol=2 if drawn > 6 else 1)
    return fig


def image_grid(rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str], row_titles: Sequence[str],
               unit: str, panel_px: int = 256) -> Figure:
    """Still images ``[H, W]`` in a labelled grid on ONE intensity scale (so mismatched levels show), each panel
    drawn at least ``panel_px`` pixels wide with nearest-neighbour upscaling, with a colour bar in ``unit``."""
    panels = [np.asarray(p, dtype=np.float64) for row in rows for p in row]
    values = np.concatenate([p[np.isfinite(p)] for p in panels]) if panels else np.empty(0)
    lo, hi = np.percentile(values, GRID_PERCENTILES) if values.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1e-6
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    height, width = panels[0].shape
    panel_w = panel_px / PNG_DPI
    panel_h = panel_w * height / width
    gap_w, gap_h = 0.15, 0.35  # inches between panels: room for the column titles
    fig = Figure(figsize=(0.45 + n_cols * panel_w + (n_cols - 1) * gap_w + 1.3,
                          0.35 + n_rows * panel_h + (n_rows - 1) * gap_h + 0.1))
    _fixed_margins(fig, left=0.45, right=1.3, bottom=0.1, top=0.35, wspace=gap_w / panel_w, hspace=gap_h / panel_h)
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    image = None
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                image = ax.imshow(row[c], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0 and r < len(row_titles):
                ax.set_ylabel(row_titles[r], fontsize=9)
    if image is not None:
        width, fig_height = fig.get_size_inches()
        bar = fig.add_axes((1 - 1.05 / width, 0.1 / fig_height, 0.15 / width, 1 - 0.45 / fig_height))
        fig.colorbar(image, cax=bar, label=f"{unit} (one scale for all panels)")
    return fig
