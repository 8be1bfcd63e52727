"""Evaluate generated movies against a reference set: load, compute metrics, write figures, report.md,
report.html and metrics.json.

Every output is written atomically (temp file, then rename) and ``metrics.json`` last, so its presence means
the evaluation finished. Figures use matplotlib's object API (``Figure``) and never touch pyplot state, so
they render headless on any backend. One :class:`cadiff.report_html.Document` renders both reports; the HTML one
embeds the figures, so it is a single file that can be mailed.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cadiff.config import Suite2pJudgeConfig, to_dict
from cadiff.errors import DataError
from cadiff.eval.inputs import common_shape, crop_sets, load_set, modal_shape, resolve_calibration
from cadiff.eval.metrics import MIN_FRAMES, MIN_SIDE, SetSummary, compare_sets, summarize_set
from cadiff.eval.suite2p_judge import judge_movie_files, judge_suite2p, require_suite2p
from cadiff.io import write_json_atomic, write_text_atomic
from cadiff.report_html import Document, save_png

log = logging.getLogger(__name__)

FIGURES = {
    "mean_image": "mean_image.png",
    "corr_image": "corr_image.png",
    "spectra": "spectra.png",
    "histogram": "histogram.png",
    "gain_fit": "gain_fit.png",
}
SUITE2P_FIGURE = "suite2p.png"
COLORS = {"gen": "tab:red", "ref": "tab:blue"}
# Clips whose photon-transfer points are drawn in the gain-fit figure (more only overplots).
GAIN_FIT_CLIPS = 8
# Target band for the gain ratio; the project goal for a noise-faithful generator (issue 7, quality benchmark).
GAIN_RATIO_BAND = (0.9, 1.1)
UNIT_LABELS = {"photons": "photons", "raw": "raw units"}


def evaluate_folders(
    gen: str | Path,
    ref: str | Path,
    out: str | Path,
    ref_split: str = "val",
    max_clips: int = 64,
    acf_lags: int = 10,
    seed: int = 0,
    clip_shape: tuple[int, int, int] | None = None,
    hdf5_key: str = "data",
    judge: str = "none",
    suite2p: Suite2pJudgeConfig | None = None,
) -> dict[str, Any]:
    """Compare the generated set ``gen`` with the reference ``ref``; write every output into ``out``.

    ``judge="suite2p"`` adds ``metrics["suite2p"]`` (:mod:`cadiff.eval.suite2p_judge`) on the sets' whole movies.
    """
    if judge == "suite2p":  # before minutes of pixel metrics
        require_suite2p()
        for path in (gen, ref):
            judge_movie_files(path)
    gen_set = load_set(gen, None, max_clips, seed, clip_shape, hdf5_key, estimate_missing=False)
    ref_set = load_set(ref, ref_split, max_clips, seed, clip_shape or modal_shape(gen_set), hdf5_key)
    # generated movies are meant to be in the reference's units: borrow its calibration when it has exactly one
    gen_set = resolve_calibration(gen_set, ref_set.source_units_calibration())
    shape = common_shape(gen_set, ref_set)
    if shape[0] < MIN_FRAMES or min(shape[1:]) < MIN_SIDE:
        raise DataError(
            f"{gen} vs {ref}: common clip shape {shape}, expected at least [{MIN_FRAMES}, {MIN_SIDE}, {MIN_SIDE}] "
            "frames/pixels shared by every clip"
        )
    gen_set, ref_set = crop_sets(shape, gen_set, ref_set)
    rate_hz = ref_set.rate_hz(True) or gen_set.rate_hz(True) or ref_set.rate_hz() or gen_set.rate_hz()
    if gen_set.units() != ref_set.units():
        raise DataError(f"{gen} is in {gen_set.units()} units but {ref} in {ref_set.units()} units: expected one kind "
                        "(generated movies borrow the reference's calibration; write samples.json with "
                        "{\"calibration\": \"none\"} for movies in raw units)")
    units = ref_set.units()
    gen_summary = summarize_set(gen_set.in_units(), acf_lags, seed, name=str(gen), units=units)
    ref_summary = summarize_set(ref_set.in_units(), acf_lags, seed + 1, name=str(ref), units=units,
                                groups=ref_set.recordings)
    metrics = compare_sets(gen_summary, ref_summary, rate_hz=rate_hz, seed=seed)
    metrics.update(
        gen=gen_set.describe(),
        ref=ref_set.describe(),
        rate_hz=rate_hz,
        settings={"ref_split": ref_split, "max_clips": max_clips, "acf_lags": acf_lags, "seed": seed},
        # the photon-transfer figure has nothing to show in raw units
        figures={k: v for k, v in FIGURES.items() if units == "photons" or k != "gain_fit"},
    )
    out = Path(out)
    if judge == "suite2p":
        metrics["suite2p"] = judge_suite2p(gen, ref, out, suite2p or Suite2pJudgeConfig(), hdf5_key)
        metrics["figures"]["suite2p"] = SUITE2P_FIGURE
    document = report_document(metrics, write_figures(out, gen_summary, ref_summary, metrics))
    write_text_atomic(out / "report.md", document.markdown())
    document.write_html(out / "report.html")
    write_json_atomic(out / "metrics.json", metrics)
    log.info("evaluation written to %s", out)
    return metrics


def evaluate_config(cfg: Any) -> dict[str, Any]:
    """:func:`evaluate_folders` driven by an ``EvaluateConfig`` (the ``jobs/evaluate.py`` entry point)."""
    dims = (cfg.clip_frames, cfg.clip_height, cfg.clip_width)
    clip_shape = None
    if any(d is not None for d in dims):
        # an unset axis is never cut: tiling takes a movie axis whole when it is shorter than the clip
        clip_shape = tuple(int(d) if d is not None else sys.maxsize for d in dims)
    return evaluate_folders(
        cfg.gen,
        cfg.ref,
        cfg.out,
        ref_split=cfg.ref_split,
        max_clips=cfg.max_clips,
        acf_lags=cfg.acf_lags,
        seed=cfg.seed,
        clip_shape=clip_shape,
        hdf5_key=cfg.hdf5_key,
        judge=cfg.judge,
        suite2p=Suite2pJudgeConfig(**to_dict(cfg.suite2p)),
    )


def summary_line(metrics: dict[str, Any]) -> str:
    """The job's key results, e.g. ``gain_ratio=0.98 mmd=0.0100 mmd_baseline=0.0020 clips=4/16``."""
    mmd = metrics["mmd"]
    units = " units=raw" if metrics["units"] == "raw" else ""
    line = (
        f"gain_ratio={_fmt(metrics['noise']['gain_ratio'], 3)}{units} mmd={_fmt(mmd['mmd2'], 4)} "
        f"mmd_baseline={_fmt(mmd['baseline_mmd2'], 4)} clips={mmd['num_gen']}/{mmd['num_ref']}"
    )
    s2p = metrics.get("suite2p")
    if s2p:
        line += (f" suite2p_rois={s2p['gen']['rois']}/{s2p['ref']['rois']} "
                 f"density_ratio={_fmt(s2p['compare']['density_ratio'])}")
        truth = s2p["ref"]["truth"]
        if truth:
            line += f" suite2p_ref_f1={_fmt(truth['f1'])}"
    return line


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.{digits}g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# figures


def _image_pair(gen: np.ndarray, ref: np.ndarray, title: str, unit: str) -> Figure:
    fig = Figure(figsize=(9, 4))
    both = np.concatenate([gen.ravel(), ref.ravel()])
    vmin, vmax = np.percentile(both, [0.5, 99.5])
    axes = fig.subplots(1, 2)
    for ax, image, label in zip(axes, (gen, ref), ("generated", "reference")):
        im = ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-6)
        ax.set_title(f"{label}: {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label=unit)
    return fig


def _spectra(gen: SetSummary, ref: SetSummary, metrics: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(14, 4))
    ax_t, ax_s, ax_a = fig.subplots(1, 3)
    temporal = metrics["temporal"]
    hz = temporal["freqs_hz"] is not None
    freqs = np.asarray(temporal["freqs_hz"] if hz else temporal["freqs_cycles_per_frame"])
    s_freqs = np.asarray(metrics["spatial"]["freqs_cycles_per_pixel"])
    for key, summary in (("gen", gen), ("ref", ref)):
        label = "generated" if key == "gen" else "reference"
        ax_t.semilogy(freqs, summary.mean_curve("temporal_psd"), color=COLORS[key], label=label)
        ax_s.semilogy(s_freqs, summary.mean_curve("spatial_psd"), color=COLORS[key], label=label)
        ax_a.plot(temporal["acf_lags"], summary.mean_curve("acf"), "o-", color=COLORS[key], label=label)
    unit = UNIT_LABELS[metrics["units"]]
    ax_t.set(xlabel="frequency (Hz)" if hz else "frequency (cycles/frame)", ylabel=f"power ({unit}$^2$)",
             title=f"temporal PSD ({_fmt(temporal['psd_distance_db'], 2)} dB rms)")
    ax_s.set(xlabel="spatial frequency (cycles/pixel)", ylabel=f"power ({unit}$^2$)",
             title=f"spatial PSD ({_fmt(metrics['spatial']['psd_distance_db'], 2)} dB rms)")
    ax_a.set(xlabel="lag (frames)", ylabel="autocorrelation", title=f"temporal ACF (MAE {_fmt(temporal['acf_mae'])})")
    for ax in (ax_t, ax_s, ax_a):
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def _histogram(gen: SetSummary, ref: SetSummary, metrics: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    lo, hi = np.percentile(np.concatenate([gen.pixels, ref.pixels]), [0.01, 99.99])
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 80)
    ax.hist(ref.pixels, bins=bins, density=True, histtype="step", color=COLORS["ref"], label="reference")
    ax.hist(gen.pixels, bins=bins, density=True, histtype="step", color=COLORS["gen"], label="generated")
    ax.set_yscale("log")
    unit = UNIT_LABELS[metrics["units"]]
    ax.set(xlabel=f"intensity ({unit})", ylabel="density", title=f"pixel intensities (W1 {_fmt(metrics['intensity']['w1'])} {unit})")
    ax.legend()
    return fig


def _gain_fit(gen: SetSummary, ref: SetSummary, metrics: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    noise = metrics["noise"]
    for key, summary in (("ref", ref), ("gen", gen)):
        label = "generated" if key == "gen" else "reference"
        means = np.concatenate([s.pt_means for s in summary.stats[:GAIN_FIT_CLIPS]])
        variances = np.concatenate([s.pt_variances for s in summary.stats[:GAIN_FIT_CLIPS]])
        ax.scatter(means, variances, s=8, alpha=0.5, color=COLORS[key])
        gain, offset = noise[f"gain_{key}"], noise[f"offset_{key}"]
        if gain is not None and offset is not None and means.size:
            x = np.linspace(min(means.min(), offset), means.max(), 50)
            ax.plot(x, gain * (x - offset), color=COLORS[key], label=f"{label}: gain {_fmt(gain)}, offset {_fmt(offset, 2)}")
        else:
            ax.scatter([], [], color=COLORS[key], label=f"{label}: no fit")
    ax.set(xlabel="mean (photons)", ylabel="variance (photons$^2$)",
           title=f"photon transfer (gain ratio {_fmt(noise['gain_ratio'])})")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _suite2p_figure(s2p: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(14, 4), layout="constrained")
    ax_d, ax_s, ax_n = fig.subplots(1, 3)
    labels = {"gen": "generated", "ref": "reference"}
    densities = [s2p[k]["density_per_10k_px"] or 0.0 for k in ("gen", "ref")]
    ax_d.bar([labels["gen"], labels["ref"]], densities, color=[COLORS["gen"], COLORS["ref"]])
    ax_d.set(ylabel="ROIs per 10,000 px", title=f"ROI density (ratio {_fmt(s2p['compare']['density_ratio'])})")
    for ax, key, name, unit in ((ax_s, "sizes", "size", "pixels"), (ax_n, "snrs", "SNR", "p99 above median / noise")):
        values = [np.asarray(s2p[key][k]) for k in ("gen", "ref")]
        pooled = np.concatenate(values)
        bins = np.linspace(pooled.min(), pooled.max() + 1e-9, 30) if pooled.size else 10
        for k, v in zip(("gen", "ref"), values):
            if v.size:
                ax.hist(v, bins=bins, density=True, histtype="step", color=COLORS[k], label=f"{labels[k]} ({v.size})")
        ax.set(xlabel=unit, ylabel="density",
               title=f"ROI {name} (KS {_fmt(s2p['compare'][('size' if key == 'sizes' else 'snr') + '_ks'])})")
        if pooled.size:
            ax.legend()
    return fig


def write_figures(out: Path, gen: SetSummary, ref: SetSummary, metrics: dict[str, Any]) -> dict[str, bytes]:
    """Side-by-side PNGs: mean image, correlation image, spectra + ACF, histograms, photon-transfer fit (the ones
    ``metrics["figures"]`` lists). Returns each figure's PNG bytes by key (for the HTML report)."""
    out.mkdir(parents=True, exist_ok=True)
    g0, r0 = gen.stats[0], ref.stats[0]
    figures = {
        "mean_image": lambda: _image_pair(g0.mean_image, r0.mean_image, "mean image (clip 0)", UNIT_LABELS[metrics["units"]]),
        "corr_image": lambda: _image_pair(g0.corr_image, r0.corr_image, "correlation image (clip 0)", "mean neighbour r"),
        "spectra": lambda: _spectra(gen, ref, metrics),
        "histogram": lambda: _histogram(gen, ref, metrics),
        "gain_fit": lambda: _gain_fit(gen, ref, metrics),
        "suite2p": lambda: _suite2p_figure(metrics["suite2p"]),
    }
    return {key: save_png(figures[key](), out / fname, dpi=110, tight=True) for key, fname in metrics["figures"].items()}


# ---------------------------------------------------------------------------------------------------------
# report


def _row(name: str, gen: Any, ref: Any, diff: Any = None, digits: int = 3) -> list[str]:
    return [name, _fmt(gen, digits), _fmt(ref, digits), _fmt(diff, digits) if diff is not None else ""]


def _set_row(name: str, value: Any, digits: int = 3) -> list[str]:
    """A row for a metric of the pair of sets (no per-set value)."""
    return [name, "", "", _fmt(value, digits)]


def _diff(a: Any, b: Any) -> float | None:
    return a - b if a is not None and b is not None else None


FIGURE_CAPTIONS = {
    "mean_image": "Mean image of the first clip of each set",
    "corr_image": "Local correlation image (mean correlation with the 8 neighbours) of the first clip",
    "spectra": "Temporal PSD, spatial PSD and temporal autocorrelation (set means)",
    "histogram": "Pixel intensity histograms",
    "gain_fit": "Photon transfer: per-pixel variance vs mean with the fitted lines",
    "suite2p": "suite2p ROIs: density, size and SNR distributions (all ROIs of every judged movie)",
}


def report_document(metrics: dict[str, Any], figures: dict[str, bytes]) -> Document:
    """The report (Markdown: report.md, HTML: report.html): inputs, headline verdicts, metrics table, figures."""
    mmd = metrics["mmd"]
    gain_verdict, gain_note, mmd_verdict = _verdicts(metrics)
    doc = Document("cadiff evaluation")
    doc.bullets([
        f"generated: `{metrics['gen']['path']}` ({metrics['gen']['kind']}, {metrics['gen']['num_clips']} clips)",
        f"reference: `{metrics['ref']['path']}` ({metrics['ref']['kind']}, {metrics['ref']['num_clips']} clips, "
        f"split `{metrics['settings']['ref_split']}`)",
        f"clip shape [T, H, W]: {metrics['clip_shape']}; frame rate: {_fmt(metrics['rate_hz'], 2)} Hz",
        f"calibrations (generated): {_calibrations(metrics['gen'])}",
        f"calibrations (reference): {_calibrations(metrics['ref'])}",
    ])
    doc.heading("Headline").bullets([
        f"**photon-transfer gain ratio** (generated / reference): **{_fmt(metrics['noise']['gain_ratio'])}** - "
        f"{gain_verdict}.{gain_note}",
        f"**MMD^2** of per-clip features: **{_fmt(mmd['mmd2'], 4)}** vs reference split-half "
        f"{_fmt(mmd['baseline_mmd2'], 4)} +- {_fmt(mmd['baseline_mmd2_std'], 4)} ({_split_unit(mmd)}) - {mmd_verdict}.",
    ])
    doc.heading(f"Metrics ({UNIT_LABELS[metrics['units']]}; per-clip medians)")
    doc.table(["metric", "generated", "reference", "difference"], _metric_rows(metrics))
    doc.paragraph(f"MMD features ({len(mmd['feature_names'])}, z-scored over both sets): "
                  f"{', '.join(mmd['feature_names'])}; kernel bandwidth {_fmt(mmd['bandwidth'])}.")
    if metrics.get("suite2p"):
        _suite2p_section(doc, metrics["suite2p"])
    doc.heading("Figures")
    for key, fname in metrics["figures"].items():
        doc.heading(FIGURE_CAPTIONS[key], 3).figure(figures[key], key, filename=fname)
    return doc


def _split_unit(mmd: dict[str, Any]) -> str:
    """How the reference split-half was split: by recording (how many) or by clip (one recording)."""
    recordings = mmd.get("baseline_recordings")
    if mmd.get("baseline_unit") == "recording":
        return f"halves of its {recordings} recordings"
    if recordings == 1:
        return "random halves of its clips: one recording, so it understates two real recordings' difference"
    if recordings:
        return f"random halves of its clips: its {recordings} recordings hold too few clips for a split by recording"
    return "random halves of its clips"


def _suite2p_section(doc: Document, s2p: dict[str, Any]) -> None:
    """The suite2p judge's table: per-set ROI figures, their comparison, F1 against ground truth where known."""
    gen, ref, cmp_ = s2p["gen"], s2p["ref"], s2p["compare"]
    settings = s2p["settings"]
    doc.heading("suite2p judge")
    doc.paragraph(f"suite2p's functional ROI detection on {gen['movies']} generated and {ref['movies']} reference "
                  f"movies (tau {settings['tau']} s, spatial_scale {settings['spatial_scale']}, threshold_scaling "
                  f"{settings['threshold_scaling']}); sizes and SNRs are compared by the two-sample KS statistic "
                  "(0: same distribution, 1: disjoint).")

    def truth(summary: dict[str, Any]) -> str:
        t = summary["truth"]
        return "no ground truth" if not t else f"{_fmt(t['f1'])} (P {_fmt(t['precision'])}, R {_fmt(t['recall'])}, {t['n_true']} true)"

    rows = [
        _row("ROIs (cells by suite2p's classifier)", f"{gen['rois']} ({gen['cells']})", f"{ref['rois']} ({ref['cells']})"),
        _row("ROIs per 10,000 px", gen["density_per_10k_px"], ref["density_per_10k_px"], cmp_["density_ratio"]),
        _row("ROI size median (px)", gen["size_px"]["median"], ref["size_px"]["median"], cmp_["size_median_ratio"]),
        _row("ROI SNR median", gen["snr"]["median"], ref["snr"]["median"], cmp_["snr_median_ratio"]),
        _set_row("ROI size KS statistic", cmp_["size_ks"]),
        _set_row("ROI size KS, reference even vs odd movies", cmp_["size_ks_baseline"]),
        _set_row("ROI SNR KS statistic", cmp_["snr_ks"]),
        _set_row("ROI SNR KS, reference even vs odd movies", cmp_["snr_ks_baseline"]),
        [f"F1 vs ground truth (IoU >= {settings['iou']:g})", truth(gen), truth(ref), ""],
    ]
    doc.table(["metric", "generated", "reference", "ratio gen/ref or distance"], rows)


def _verdicts(metrics: dict[str, Any]) -> tuple[str, str, str]:
    """(gain-ratio verdict, a note on it, MMD verdict) in words."""
    noise, mmd = metrics["noise"], metrics["mmd"]
    ratio = noise["gain_ratio"]
    lo, hi = GAIN_RATIO_BAND
    gain_note = " A generator that smooths shot noise (e.g. a regression autoencoder) falls well below 1."
    if noise.get("not_applicable"):
        gain_verdict, gain_note = noise["not_applicable"], ""
    elif ratio is None:
        gain_verdict = "n/a (no photon-transfer fit)"
    else:
        gain_verdict = f"{'within' if lo <= ratio <= hi else 'OUTSIDE'} the {lo}-{hi} band"
    if mmd["mmd2"] is None or mmd["baseline_mmd2"] is None:
        return gain_verdict, gain_note, "n/a (needs >= 2 generated and >= 4 reference clips)"
    noise_level = mmd["baseline_mmd2"] + 2 * (mmd["baseline_mmd2_std"] or 0.0)
    mmd_verdict = (
        "indistinguishable from a reference split" if mmd["mmd2"] <= noise_level
        else "above the reference split-half level (mean + 2 std)"
    )
    return gain_verdict, gain_note, mmd_verdict


def _metric_rows(metrics: dict[str, Any]) -> list[list[str]]:
    noise, inten, temp, spat, mmd = (metrics[k] for k in ("noise", "intensity", "temporal", "spatial", "mmd"))
    unit = UNIT_LABELS[metrics["units"]]
    return [
        *_noise_rows(noise),
        _row(f"mean intensity ({unit})", inten["mean_gen"], inten["mean_ref"], _diff(inten["mean_gen"], inten["mean_ref"])),
        _set_row(f"intensity W1 ({unit})", inten["w1"]),
        _set_row("intensity W1 / reference std", inten["w1_rel"]),
        _row("pixel skewness", inten["skewness_gen"], inten["skewness_ref"], _diff(inten["skewness_gen"], inten["skewness_ref"])),
        _row("pixel excess kurtosis", inten["kurtosis_gen"], inten["kurtosis_ref"], _diff(inten["kurtosis_gen"], inten["kurtosis_ref"])),
        _set_row("temporal log-PSD distance (dB rms)", temp["psd_distance_db"]),
        _row("autocorrelation lag 1", temp["acf_gen"][0], temp["acf_ref"][0], _diff(temp["acf_gen"][0], temp["acf_ref"][0])),
        _set_row(f"autocorrelation MAE (lags 1-{len(temp['acf_lags'])})", temp["acf_mae"]),
        _row("correlation image median", spat["corr_median_gen"], spat["corr_median_ref"],
             _diff(spat["corr_median_gen"], spat["corr_median_ref"])),
        _row("correlation image p99", spat["corr_p99_gen"], spat["corr_p99_ref"], _diff(spat["corr_p99_gen"], spat["corr_p99_ref"])),
        _set_row("spatial log-PSD distance (dB rms)", spat["psd_distance_db"]),
        _set_row("MMD^2 (RBF, median bandwidth)", mmd["mmd2"], 4),
        _set_row("MMD^2 reference split-half", mmd["baseline_mmd2"], 4),
    ]


def _noise_rows(noise: dict[str, Any]) -> list[list[str]]:
    if noise.get("not_applicable"):
        return [["photon-transfer gain, offset, fit R^2", "not applicable", "not applicable", ""]]
    return [
        _row("photon-transfer gain", noise["gain_gen"], noise["gain_ref"], _diff(noise["gain_gen"], noise["gain_ref"])),
        _row("photon-transfer offset (photons)", noise["offset_gen"], noise["offset_ref"], noise["offset_diff"]),
        _row("photon-transfer fit R^2", noise["r2_gen"], noise["r2_ref"]),
    ]


def _calibrations(described: dict[str, Any]) -> str:
    parts = []
    for c in described["calibrations"]:
        if c is None:
            parts.append("unknown")
        elif c.get("units") == "raw":
            parts.append(f"raw units, no photon scale ({c['origin']})")
        else:
            parts.append(f"gain {_fmt(c['gain'])} ADU/photon, offset {_fmt(c['offset'], 1)} ADU ({c['origin']})")
    return "; ".join(parts)
