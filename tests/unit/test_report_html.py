"""Reports: the HTML document model (escaping, embedded PNGs, atomic writes), labelled one-scale image grids,
preview videos on one scale, the training-run / evaluation / sweep reports built from small synthetic inputs,
the sweep plot's readable tick labels, and every kind of report rendered in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cadiff.errors import DataError
from cadiff.eval.metrics import compare_sets, summarize_set
from cadiff.eval.report import FIGURES, report_document
from cadiff.report_html import CurvePanel, Document, Series, curve_grid, figure_png, image_grid
from cadiff.runtime.video import upscale_factor, video_grid
from cadiff.train.media import write_still
from cadiff.train.report import REPORT_NAME, RunReport, write_run_report
from cadiff.tune.report import plot_metric_vs_params, write_sweep_report
from cadiff.tune.space import Param

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert('x')</script> & \"q\""


def _png_size(png: bytes) -> tuple[int, int]:
    import matplotlib.image

    height, width = matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2]
    return width, height


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


# ---------------------------------------------------------------------------------------------------------
# synthetic inputs of the three reports


def write_synthetic_run(run_dir: Path, steps: int = 40, val_every: int = 10, preview: bool = True) -> Path:
    """A stage-1 run folder as the loop leaves it: metrics.jsonl with latent-use telemetry, config, a still."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for step in range(1, steps + 1):
            record = {"step": step, "loss": 1 / step + 0.1, "grad_norm": 2 / step, "lr": 1e-3 * min(1, step / 5),
                      "samples_per_s": 10.0 + step % 3, "mfu": 0.01, "data_wait_frac": 0.1}
            if step % val_every == 0:
                record.update(val_loss=1 / step + 0.2, val_loss_z=0.5 / step + 0.1, val_loss_shuffled_z=0.6)
                record["val_latent_use"] = record["val_loss_z"] / 0.6
                for t in (10, 50, 90):
                    record[f"val_loss_z_t{t}"] = t / 100 / step + 0.05
                    record[f"val_loss_shuffled_z_t{t}"] = t / 100 + 0.1
            fh.write(json.dumps(record) + "\n")
    (run_dir / "config.yaml").write_text(f"trainer:\n  max_steps: 50\nnote: {json.dumps(HOSTILE)}\n")
    if preview:
        clips = np.random.default_rng(0).poisson(20, size=(2, 5, 16, 16)).astype(np.float32)
        rows = [[c[2], 1.5 * c[2], c.mean(0), 1.5 * c.mean(0)] for c in clips]
        write_still(rows, ["input", "reconstruction", "input mean", "reconstruction mean"], ["clip 0", "clip 1"],
                    run_dir / "media" / "recon_step0000040.png")
    return run_dir


def build_train_report(tmp_path: Path) -> Path:
    return write_run_report(write_synthetic_run(tmp_path / "run"), "train_ae")


def _tiny_figure(label: str) -> bytes:
    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1, 2], [1, 0, 1], label=label)
    return figure_png(fig)


def build_eval_document(tmp_path: Path) -> Document:
    """The evaluation report of two tiny Poisson sets (real metrics, stand-in figures)."""
    rng = np.random.default_rng(0)
    gen = summarize_set(rng.poisson(5, size=(2, 17, 16, 16)).astype(np.float32), 3, 0, name="gen")
    ref = summarize_set(rng.poisson(5, size=(4, 17, 16, 16)).astype(np.float32), 3, 1, name="ref")
    metrics = compare_sets(gen, ref, rate_hz=10.0, seed=0)
    calibration = {"gain": 2.0, "offset": 100.0, "origin": "samples.json"}
    metrics.update(
        gen={"path": str(tmp_path / "<gen>"), "kind": "movies", "num_clips": 2, "calibrations": [calibration]},
        ref={"path": str(tmp_path / "ref"), "kind": "shards", "num_clips": 4, "calibrations": [None]},
        rate_hz=10.0, settings={"ref_split": "val", "max_clips": 64, "acf_lags": 3, "seed": 0}, figures=dict(FIGURES),
    )
    return report_document(metrics, {key: _tiny_figure(key) for key in FIGURES})


def build_eval_report(tmp_path: Path) -> Path:
    return build_eval_document(tmp_path).write_html(tmp_path / "eval" / "report.html")


SWEEP_PARAMS = {
    "trainer.lr": Param("trainer.lr", "loguniform", (1e-4, 3e-3)),
    "model.kl_weight": Param("model.kl_weight", "loguniform", (2e-4, 8e-4)),  # under one decade
    "trainer.weight_decay": Param("trainer.weight_decay", "loguniform", (1e-7, 1e-1)),  # six decades
    "model.diffusion.time_sampler": Param("model.diffusion.time_sampler", "choice", (["uniform", "logit_normal"],)),
    "model.z_channels": Param("model.z_channels", "grid", ([4, 8],)),
    "model.diffusion.logit_std": Param("model.diffusion.logit_std", "uniform", (0.5, 1.5)),
    "model.depth": Param("model.depth", "int", (2, 6)),
    "ema.decay": Param("ema.decay", "uniform", (0.9, 0.999)),
}


def sweep_rows(count: int = 8) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(count):
        row = {"trial": f"run_trial_{i:05d}", "status": "ok", "trainer.lr": float(10 ** rng.uniform(-4, -2.5)),
               "model.kl_weight": float(rng.uniform(2e-4, 8e-4)), "trainer.weight_decay": float(10 ** rng.uniform(-7, -1)),
               "model.diffusion.time_sampler": ["uniform", "logit_normal"][i % 2], "model.z_channels": [4, 8][i % 2],
               "model.diffusion.logit_std": float(rng.uniform(0.5, 1.5)), "model.depth": int(rng.integers(2, 7)),
               "ema.decay": float(rng.uniform(0.9, 0.999)), "val_loss": float(rng.uniform(0.2, 1.0)), "steps": 6,
               "early_stopped": i == 3}
        rows.append(row)
    return rows


def build_sweep_report(tmp_path: Path) -> Path:
    sweep_dir = tmp_path / "sweep" / "kl"
    rows = sweep_rows()
    trials = {}
    for i, row in enumerate(rows):
        run_dir = sweep_dir / "trials" / "train_ae" / f"trial_{i}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1 / s + i / 10, "val_loss": 1 / s + i / 10 + 0.1}) + "\n" for s in range(1, 7)))
        trials[row["trial"]] = run_dir
    best = min(rows, key=lambda r: r["val_loss"])
    return write_sweep_report(sweep_dir, rows, SWEEP_PARAMS, "val_loss", "min", best,
                              f"# @package _global_\nnote: {HOSTILE!r}\n", trials, [f"space: `{HOSTILE}`"])


BUILDERS = {"run": build_train_report, "eval": build_eval_report, "sweep": build_sweep_report}


@pytest.fixture(scope="module")
def built_reports(tmp_path_factory) -> dict[str, Path]:
    """Each kind of report built once for this module (the content tests and the browser test share them)."""
    return {kind: build(tmp_path_factory.mktemp(kind)) for kind, build in BUILDERS.items()}


# ---------------------------------------------------------------------------------------------------------
# the document model


def test_document_escapes_text_and_embeds_figures_as_data_uris(tmp_path):
    png = _tiny_figure("x")
    doc = (Document(f"title {HOSTILE}").paragraph(f"**bold** and `code` and {HOSTILE}").bullets([HOSTILE])
           .table(["a", HOSTILE], [[HOSTILE, 1.5]]).code(f"</pre>{HOSTILE}").figure(png, HOSTILE, "f.png", HOSTILE))
    page = doc.html()
    assert "<script" not in page and "</pre><" not in page
    assert page.count("&lt;script&gt;") == 9  # title (twice), paragraph, bullet, header, cell, code, alt, caption
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page
    assert 'alt="&lt;script&gt;' in page and "<figcaption>&lt;script&gt;" in page
    assert _embedded_pngs(page) == [png] and "http" not in page
    markdown = doc.markdown()
    assert markdown.startswith(f"# title {HOSTILE}") and f"![{HOSTILE}](f.png)" in markdown
    assert f"| {HOSTILE} | 1.5 |" in markdown


def test_a_failed_report_write_keeps_the_previous_report_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = Document("old").write_html(tmp_path / "report.html")
    old = path.read_text()

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        Document("new").paragraph("x" * 1000).write_html(path)
    assert path.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


# ---------------------------------------------------------------------------------------------------------
# images: one intensity scale per grid, enlarged, labelled


def test_image_grid_puts_every_panel_on_one_scale_enlarged_and_labelled():
    dim = np.random.default_rng(0).uniform(10, 20, size=(16, 16))
    fig = image_grid([[dim, 2 * dim], [dim, 2 * dim]], ["input", "reconstruction"], ["clip 0", "clip 1"], "photons")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 4 and len({im.get_clim() for im in images}) == 1  # one scale: 2x brighter shows
    assert images[0].get_interpolation() == "nearest"
    lo, hi = images[0].get_clim()
    assert lo <= dim.min() + 1 and hi >= 2 * dim.max() - 1
    assert [ax.get_title() for ax in fig.axes[:2]] == ["input", "reconstruction"]
    assert fig.axes[0].get_ylabel() == "clip 0" and "photons" in fig.axes[-1].get_ylabel()
    width, height = _png_size(figure_png(fig))
    assert width >= 2 * 256 and height >= 2 * 256


def test_preview_video_grid_shares_one_scale_and_enlarges_small_panels():
    panel = np.random.default_rng(0).uniform(10, 20, size=(3, 16, 16)).astype(np.float32)
    blank = np.zeros_like(panel)  # padding of a partial row: sets no scale
    grid = video_grid([[panel, 2 * panel, blank]], pad=0)
    factor = 128 // 16
    assert grid.shape == (3, 16 * factor, 3 * 16 * factor)
    first, second = grid[:, :, : 16 * factor], grid[:, :, 16 * factor : 32 * factor]
    assert second.mean() > 1.5 * first.mean() + 20, "panels scaled on their own hide a 2x intensity mismatch"
    assert upscale_factor((16, 16), grid_bytes=2**40) == 1  # a huge grid is never enlarged
    assert upscale_factor((512, 512), grid_bytes=1) == 1


class _StubAE(torch.nn.Module):
    """Reconstructs 1.5x too bright: the one-scale still must show it."""

    def reconstruct(self, x):
        return 1.5 * x


class _StubDiT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def sample(self, shape, generator=None):
        return torch.rand(shape, generator=generator)


class _StubDecoder(torch.nn.Module):
    def decode(self, z):
        return z.mean(1, keepdim=True).repeat_interleave(4, dim=2).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


PHOTON_NORM = {"kind": "photon", "center": 0.0, "scale": 10.0}
CALIB = {"gain": 2.0, "offset": 100.0, "read_noise": 0.0}


def test_training_previews_write_videos_and_labelled_stills(tmp_path, monkeypatch):
    from cadiff.train import media

    logger_cfg = SimpleNamespace(video_fps=5)
    x = torch.rand(2, 1, 5, 16, 16) + 1.0
    paths = media.log_stage1(_StubAE(), x, PHOTON_NORM, CALIB, tmp_path, 7, logger_cfg)
    assert [p.name for p in paths] == ["recon_step0000007.gif", "recon_step0000007.mp4", "recon_step0000007.png"]
    width, height = _png_size(paths[2].read_bytes())
    assert width >= 4 * 256 and height >= 2 * 256

    import imageio.v3 as iio

    assert iio.imread(paths[0]).shape[:3] == (5, 2 * (16 + 4) * 8, 4 * (16 + 4) * 8)  # 16 px panels (+ pad) x 8
    monkeypatch.setattr(media, "load_exported_model", lambda *a: (_StubDecoder(), {"data": {
        "normalization": PHOTON_NORM, "sources": {"sim": CALIB}}}, None))
    paths = media.log_stage2(_StubDiT(), (4, 2, 2, 2), (torch.zeros(4), torch.ones(4)), "stage1", tmp_path, 9, logger_cfg)
    assert [p.name for p in paths] == ["samples_step0000009.gif", "samples_step0000009.mp4", "samples_step0000009.png"]
    assert paths[2].read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------------------
# the three reports


def test_run_report_shows_curves_latent_use_noise_levels_preview_and_config(built_reports):
    report = built_reports["run"]
    page = report.read_text()
    pngs = _embedded_pngs(page)
    assert len(pngs) == 3 and all(p[:8] == PNG_MAGIC for p in pngs)  # curves, latent use + noise level, preview
    assert "step</td><td>40 of 50" in page and "val_latent_use" in page
    assert "Latent use and noise level" in page and "recon_step0000040.png" in page
    assert "&lt;script&gt;" in page and "<script" not in page
    assert not list(report.parent.glob(".*tmp*"))


def test_run_report_before_the_first_metrics_and_previews_says_what_is_missing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    page = write_run_report(run_dir, "train_latent").read_text()
    assert "No metrics logged yet" in page and "No preview yet" in page and "(not recorded yet)" in page
    assert _embedded_pngs(page) == [] and "Latent use" not in page


def test_run_report_skips_a_torn_last_line_and_names_a_torn_earlier_one(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", steps=12, preview=False)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 13, "lo')
    assert len(_embedded_pngs(write_run_report(run_dir, "train_ae").read_text())) == 2
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{torn", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl: a line before the last is not JSON"):
        write_run_report(run_dir, "train_ae")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"metrics.jsonl: record 2 is list \[1, 2\]; expected a JSON object"):
        write_run_report(run_dir, "train_ae")


def test_run_report_refreshes_at_most_once_per_interval_and_never_raises(tmp_path, caplog):
    run_dir = write_synthetic_run(tmp_path / "run", steps=10, preview=False)
    RunReport(run_dir, "train_ae", min_interval_s=0).refresh(5)
    assert (run_dir / REPORT_NAME).is_file()
    (run_dir / REPORT_NAME).unlink()
    report = RunReport(run_dir, "train_ae", min_interval_s=3600)
    report.refresh(5)
    assert not (run_dir / REPORT_NAME).exists(), "a session younger than the interval wrote a report before its end"
    report.refresh(10, last=True)
    assert (run_dir / REPORT_NAME).is_file()
    (run_dir / REPORT_NAME).unlink()
    report.refresh(15)
    assert not (run_dir / REPORT_NAME).exists(), "refreshed again inside the interval"
    (run_dir / "metrics.jsonl").write_text('{torn\n{"step": 1}\n')
    with caplog.at_level(logging.WARNING, logger="cadiff.train.report"):
        report.refresh(20, last=True)  # the last step always refreshes; a failure is a warning
    assert "report.html not refreshed at step 20" in caplog.text and "not JSON" in caplog.text
    assert not (run_dir / REPORT_NAME).exists()


def test_eval_report_markdown_links_the_figures_and_html_embeds_them(tmp_path):
    doc = build_eval_document(tmp_path)
    markdown, page = doc.markdown(), doc.html()
    for key, name in FIGURES.items():
        assert f"![{key}]({name})" in markdown
    assert len(_embedded_pngs(page)) == len(FIGURES)
    assert "**photon-transfer gain ratio** (generated / reference)" in markdown
    assert "<strong>photon-transfer gain ratio</strong>" in page and "&lt;gen&gt;" in page
    assert "| metric | generated | reference | difference |" in markdown and "<th>difference</th>" in page


def test_sweep_report_and_plot_grid(built_reports):
    page = built_reports["sweep"].read_text()
    sweep_dir = built_reports["sweep"].parent
    plot = (sweep_dir / "metric_vs_params.png").read_bytes()
    pngs = _embedded_pngs(page)
    assert pngs[0] == plot and len(pngs) == 2  # the plot and the per-trial curves
    width, height = _png_size(plot)
    assert 3 * 400 <= width <= 3 * 480 and 3 * 300 <= height  # 8 panels: 3 columns x 3 rows, not one strip
    assert page.count("<tr>") == 1 + 8 and "&lt;script&gt;" in page and "<script" not in page


def _overlaps(boxes) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_sweep_plot_tick_labels_do_not_overlap_on_log_and_category_axes():
    rows = sweep_rows()
    fig = plot_metric_vs_params(rows, SWEEP_PARAMS, "val_loss", rows[0])
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        inside = [t for t in labels if ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        assert 2 <= len(inside) <= 8, (ax.get_title(), [t.get_text() for t in inside])
        assert not _overlaps([t.get_window_extent(renderer) for t in inside]), ax.get_title()


def test_curve_grid_drops_non_finite_points_and_uses_log_only_for_positive_data():
    fig = curve_grid([
        CurvePanel("loss", [Series("a", [1, 2, 3], [1.0, float("nan"), 0.5])], log_y=True),
        CurvePanel("signed", [Series("b", [1, 2], [-1.0, 1.0])], log_y=True),
    ])
    first, second = fig.axes
    assert list(first.get_lines()[0].get_xdata()) == [1.0, 3.0] and first.get_yscale() == "log"
    assert second.get_yscale() == "linear"


# ---------------------------------------------------------------------------------------------------------
# a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# Appended to a copy of the report (the report itself carries no script): after load, record how many images
# the page has and how many decoded with a non-zero natural width.
PROBE = ("<script>addEventListener('load', () => { const images = [...document.images]; document.body.dataset.loaded ="
         " images.length + '/' + images.filter(i => i.complete && i.naturalWidth > 0).length; });</script>")


def render_in_chromium(report: Path, out_dir: Path) -> tuple[str, np.ndarray]:
    """(``"<images>/<loaded>"``, screenshot RGB array) of ``report`` in headless Chromium."""
    probe = out_dir / "probe.html"
    probe.write_text(report.read_text().replace("</body>", f"{PROBE}</body>"))
    shot = out_dir / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={out_dir / 'profile'}", "--window-size=1280,1600", f"--screenshot={shot}", "--dump-dom",
           probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    loaded = re.search(r'data-loaded="([^"]*)"', proc.stdout)
    assert loaded, "the page never finished loading: " + proc.stdout[:500]
    import matplotlib.image

    return loaded.group(1), matplotlib.image.imread(shot)[..., :3]


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on PATH (Debian: apt-get install -y chromium; "
                    "`make setup` installs it where apt-get can run)")
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_report_renders_in_a_real_browser_with_every_image_loaded(kind, built_reports, tmp_path):
    report = built_reports[kind]
    expected = len(_embedded_pngs(report.read_text()))
    assert expected >= 2 and "<script" not in report.read_text()
    loaded, screenshot = render_in_chromium(report, tmp_path)
    assert loaded == f"{expected}/{expected}", f"images on the page / decoded: {loaded}"
    rgb = (screenshot * 255).astype(np.uint32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 16, f"blank screenshot ({len(colours)} colours)"
