"""suite2p as a downstream judge: its F1 on the simulator (the ceiling a generated movie can be held to) and its
figures on the demo's samples.

1. **Ceiling.** suite2p (:mod:`cadiff.eval.suite2p_judge`, the same code as ``evaluate judge=suite2p``) runs on
   simulated movies of each preset and is scored against the simulator's ground-truth ROIs at IoU >= 0.5, for a
   few detection thresholds (``threshold_scaling``); the best is the ceiling: a generated movie of that preset
   cannot be expected to let suite2p find its cells better than the simulator's own movies do.
2. **Demo samples.** When ``make demo`` has run, its long sample (``outputs/demo/samples_long``) is judged
   against freshly simulated movies of the demo's settings (the `default` preset, the sample's length and size):
   ROI density ratio, size and SNR KS statistics with the reference's even/odd-movie baseline.
3. **Demo mask sample.** ``make demo``'s mask-conditioned long sample (``outputs/demo/samples_mask``) asked for the
   ground-truth cells of an exported simulated movie (``outputs/demo/mask_source``): suite2p and the
   correlation-image detector on the sample and on that movie, matched to the requested ROIs (issue 13's ROI F1).

``python benchmarks/suite2p_judge.py [--quick]`` -> ``benchmarks/results/suite2p_judge.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cadiff.config import Suite2pJudgeConfig
from cadiff.data.simulate import simulate_movie
from cadiff.errors import CadiffError, DataError
from cadiff.eval.rois import detect_rois, match_rois, roi_contrast
from cadiff.eval.suite2p_judge import (
    JudgeMovie,
    detect_set,
    judge_movies,
    load_judge_movies,
    require_suite2p,
    summarize_detections,
)
from cadiff.io import write_json_atomic, write_text_atomic
from cadiff.runinfo import git_revision, package_versions

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "outputs" / "demo"
DEMO_SAMPLES = DEMO / "samples_long"
# make demo's mask-conditioned long sample and the simulated movie whose ground-truth cells it asked for
DEMO_MASK_SAMPLES = DEMO / "samples_mask"
DEMO_MASK_SOURCE = DEMO / "mask_source"


@dataclass(frozen=True)
class Case:
    """Simulated movies of one preset and the suite2p settings tried on them."""

    preset: str
    movies: int
    frames: int
    side: int
    tau: float  # the preset's indicator: default decay 0.7 s, two_photon 0.4 s (GCaMP6f: suite2p's tau 0.7)
    thresholds: tuple[float, ...]


CASES = (
    Case("two_photon", movies=3, frames=3000, side=128, tau=0.7, thresholds=(1.0, 0.75, 0.5)),
    Case("default", movies=4, frames=600, side=128, tau=0.7, thresholds=(1.0, 0.75, 0.5)),
)
QUICK = (
    Case("two_photon", movies=2, frames=600, side=64, tau=0.7, thresholds=(1.0, 0.5)),
    Case("default", movies=2, frames=300, side=64, tau=0.7, thresholds=(1.0, 0.5)),
)
DEMO_REF_MOVIES = 4
SEED = 1000  # simulator seeds SEED + i: not the demo's training movies (seeds 0..47)


def simulated(preset: str, count: int, frames: int, side: int, seed: int) -> list[JudgeMovie]:
    movies = []
    for i in range(count):
        movie, truth = simulate_movie(preset, frames=frames, height=side, width=side, seed=seed + i, return_clean=False)
        movies.append(JudgeMovie(f"{preset}-{seed + i}", movie.data, float(movie.rate_hz), truth.rois))
    return movies


def run_case(case: Case, work: Path) -> list[dict[str, Any]]:
    """suite2p at each threshold on the case's movies: F1/precision/recall against the truth, ROI figures, time."""
    movies = simulated(case.preset, case.movies, case.frames, case.side, SEED)
    rows = []
    for thr in case.thresholds:
        settings = Suite2pJudgeConfig(tau=case.tau, threshold_scaling=thr, min_frames=min(100, case.frames))
        t0 = time.perf_counter()
        detections = detect_set(movies, settings, work / f"{case.preset}-{thr}")
        seconds = time.perf_counter() - t0
        summary = summarize_detections(movies, detections, settings.iou)
        truth = summary["truth"]
        rows.append({"preset": case.preset, "threshold_scaling": thr, "tau": case.tau, "movies": case.movies,
                     "frames": case.frames, "side": case.side, "f1": truth["f1"], "precision": truth["precision"],
                     "recall": truth["recall"], "n_pred": truth["n_pred"], "n_true": truth["n_true"],
                     "size_median": summary["size_px"]["median"], "snr_median": summary["snr"]["median"],
                     "seconds": seconds, "seconds_per_movie": seconds / case.movies})
        log.info("%s threshold %.2f: F1 %.3f (P %.3f R %.3f, %d ROIs / %d true) in %.0f s", case.preset, thr,
                 truth["f1"], truth["precision"], truth["recall"], truth["n_pred"], truth["n_true"], seconds)
    return rows


def run_demo(samples: Path, work: Path, tau: float) -> dict[str, Any]:
    """The judge on the demo's long sample(s) against simulated movies of the demo's settings."""
    settings = Suite2pJudgeConfig(tau=tau)
    gen = load_judge_movies(samples, settings.max_movies, settings.min_frames)
    frames, side_h, side_w = gen[0].frames.shape
    if side_h != side_w:
        raise DataError(f"{samples}: sample frames {side_h}x{side_w}, expected square demo samples")
    ref = simulated("default", DEMO_REF_MOVIES, frames, side_h, SEED)
    judged = judge_movies(gen, ref, settings, work / "demo")
    return {"samples": str(samples), **{k: judged[k] for k in ("gen", "ref", "compare")}}


def run_demo_mask(samples: Path, source: Path, work: Path, tau: float, unconditional: Path | None = None
                  ) -> dict[str, Any]:
    """ROI recovery of make demo's mask-conditioned sample: suite2p and the correlation-image detector on the sample
    and on the simulated movie that defined the mask, each matched to the requested (ground-truth) ROIs; and the
    correlation contrast inside/outside the requested ROIs for both and for an unconditional sample (the control:
    no reason for its activity to sit in those cells)."""
    settings = Suite2pJudgeConfig(tau=tau)
    truth_movie = load_judge_movies(source, 1, settings.min_frames)[0]
    if truth_movie.truth is None:
        raise DataError(f"{source}: no ground-truth .npz beside {truth_movie.name}, expected a jobs/export.py folder")
    sample = load_judge_movies(samples, 1, settings.min_frames, fallback_rate_hz=truth_movie.rate_hz)[0]
    if sample.frames.shape[1:] != truth_movie.frames.shape[1:]:
        raise DataError(f"{samples}: frame {sample.frames.shape[1:]} != mask frame {truth_movie.frames.shape[1:]}")
    sample.truth = truth_movie.truth  # the requested ROIs
    result = {"samples": str(samples), "source": str(source), "requested_rois": int(len(truth_movie.truth))}
    for key, movie in (("sample", sample), ("source", truth_movie)):
        det = detect_set([movie], settings, work / f"mask-{key}")[0]
        result[f"{key}_suite2p"] = match_rois(det.masks, movie.truth, settings.iou)
        result[f"{key}_corr"] = match_rois(detect_rois(movie.frames.astype(np.float32)), movie.truth, settings.iou)
        result[f"{key}_contrast"] = roi_contrast(movie.frames, movie.truth)
    result["unconditional_contrast"] = None
    if unconditional is not None and unconditional.is_dir() and any(unconditional.glob("*.tif")):
        other = load_judge_movies(unconditional, 1, settings.min_frames, fallback_rate_hz=truth_movie.rate_hz)[0]
        if other.frames.shape[1:] == truth_movie.frames.shape[1:]:
            result["unconditional_contrast"] = roi_contrast(other.frames, truth_movie.truth)
    return result


def best(rows: list[dict[str, Any]], preset: str) -> dict[str, Any]:
    return max((r for r in rows if r["preset"] == preset), key=lambda r: r["f1"])


def summarize(rows: list[dict[str, Any]], demo: dict[str, Any] | None, mask: dict[str, Any] | None) -> dict[str, Any]:
    tp, df = best(rows, "two_photon"), best(rows, "default")
    cmp_ = demo["compare"] if demo else {}
    return {
        "two_photon_f1": tp["f1"], "two_photon_best_threshold": tp["threshold_scaling"],
        "default_f1": df["f1"], "default_best_threshold": df["threshold_scaling"],
        "demo_density_ratio": cmp_.get("density_ratio"), "demo_size_ks": cmp_.get("size_ks"),
        "demo_size_ks_baseline": cmp_.get("size_ks_baseline"), "demo_snr_ks": cmp_.get("snr_ks"),
        "demo_snr_ks_baseline": cmp_.get("snr_ks_baseline"),
        "demo_ref_f1": demo["ref"]["truth"]["f1"] if demo else None,
        "demo_mask_f1": mask["sample_suite2p"]["f1"] if mask else None,
        "demo_mask_source_f1": mask["source_suite2p"]["f1"] if mask else None,
        "demo_mask_corr_f1": mask["sample_corr"]["f1"] if mask else None,
        "demo_mask_contrast": mask["sample_contrast"]["contrast"] if mask else None,
        "demo_mask_source_contrast": mask["source_contrast"]["contrast"] if mask else None,
        "demo_unconditional_contrast": (mask["unconditional_contrast"] or {}).get("contrast") if mask else None,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# suite2p as a downstream judge", "",
        f"{'`--quick`' if res['quick'] else 'Full'} run, {res['total_s'] / 60:.1f} min on {res['meta']['cpus']} CPUs "
        f"(suite2p {res['meta']['suite2p']}, functional detection, CPU). `python benchmarks/suite2p_judge.py`. ROIs "
        "are matched one-to-one to the simulator's ground-truth ROIs at IoU >= 0.5; a suite2p ROI's mask is its "
        "pixels with weight >= 0.3 x its peak (the ground truth's own rule). Spatial scale 1 (~6 px cells).", "",
        "## Summary", "", "| key | value |", "|---|---:|",
        *[f"| `{k}` | {_fmt(v)} |" for k, v in res["summary"].items()], "",
        "## Ceiling: suite2p on simulated movies", "",
        "| preset | movies x frames x side | threshold_scaling | F1 | precision | recall | ROIs / true | size median (px) "
        "| SNR median | s per movie |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]  # fmt: skip
    for r in res["ceiling"]:
        lines.append(f"| {r['preset']} | {r['movies']} x {r['frames']} x {r['side']} | {r['threshold_scaling']} | "
                     f"{_fmt(r['f1'])} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {r['n_pred']} / {r['n_true']} | "
                     f"{_fmt(r['size_median'], 1)} | {_fmt(r['snr_median'], 2)} | {_fmt(r['seconds_per_movie'], 1)} |")
    lines += ["", "## The demo's samples", ""]
    demo = res["demo"]
    if demo is None:
        lines.append(f"Not measured: {res['demo_missing']}")
    else:
        g, r, c = demo["gen"], demo["ref"], demo["compare"]
        lines += [
            f"`{demo['samples']}` ({g['movies']} movie(s), {g['frames']} frames) against {r['movies']} simulated "
            "movies of the demo's settings (`default` preset, same length and size, other seeds).", "",
            "| metric | demo samples | simulated reference | gen/ref or KS (baseline: reference even vs odd) |",
            "|---|---:|---:|---:|",
            f"| ROIs (cells) | {g['rois']} ({g['cells']}) | {r['rois']} ({r['cells']}) | |",
            f"| ROIs per 10,000 px | {_fmt(g['density_per_10k_px'])} | {_fmt(r['density_per_10k_px'])} | "
            f"{_fmt(c['density_ratio'])} |",
            f"| ROI size median (px) | {_fmt(g['size_px']['median'], 1)} | {_fmt(r['size_px']['median'], 1)} | "
            f"KS {_fmt(c['size_ks'])} (baseline {_fmt(c['size_ks_baseline'])}) |",
            f"| ROI SNR median | {_fmt(g['snr']['median'], 2)} | {_fmt(r['snr']['median'], 2)} | "
            f"KS {_fmt(c['snr_ks'])} (baseline {_fmt(c['snr_ks_baseline'])}) |",
            f"| F1 vs ground truth | (no truth) | {_fmt(r['truth']['f1'])} | |",
        ]  # fmt: skip
    lines += ["", "## The demo's mask-conditioned sample", ""]
    mask = res["demo_mask"]
    if mask is None:
        lines.append(f"Not measured: {res['demo_mask_missing']}")
    else:
        lines += [
            f"`{mask['samples']}` asked for the {mask['requested_rois']} ground-truth cells of `{mask['source']}` "
            "(a simulated movie the models never saw); each detector's ROIs on the sample and on that movie itself "
            "(the ceiling) are matched to the requested ROIs at IoU >= 0.5.", "",
            "| detector | on | F1 | precision | recall | ROIs found |", "|---|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        for det, name in (("suite2p", "suite2p"), ("corr", "correlation image (cadiff.eval.rois)")):
            for on, label in (("sample", "generated sample"), ("source", "the simulated movie")):
                m = mask[f"{on}_{det}"]
                lines.append(f"| {name} | {label} | {_fmt(m['f1'])} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | "
                             f"{m['n_pred']} |")
        lines += ["", "Mean local correlation inside / outside the requested ROIs (per-pixel mean removed); the "
                  "unconditional long sample is the control:", "",
                  "| movie | inside | outside | contrast |", "|---|---:|---:|---:|"]
        for key, label in (("sample_contrast", "mask-conditioned sample"), ("source_contrast", "the simulated movie"),
                           ("unconditional_contrast", "unconditional sample (control)")):
            c = mask[key]
            if c is not None:
                lines.append(f"| {label} | {_fmt(c['corr_inside'])} | {_fmt(c['corr_outside'])} | {_fmt(c['contrast'])} |")
    lines += ["", f"git {res['meta']['git']}, {res['meta']['date']}", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small movies per preset (~2 min)")
    parser.add_argument("--out", type=Path, default=RESULTS / "suite2p_judge", help="results prefix: <out>.json, <out>.md")
    parser.add_argument("--samples", type=Path, default=DEMO_SAMPLES, help="generated movies to judge (make demo's)")
    parser.add_argument("--mask-samples", type=Path, default=DEMO_MASK_SAMPLES, help="a mask-conditioned sample")
    parser.add_argument("--mask-source", type=Path, default=DEMO_MASK_SOURCE,
                        help="the jobs/export.py folder whose ground truth was the sample's mask")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    a = parse_args(argv)
    t0 = time.perf_counter()
    try:
        require_suite2p()
        with tempfile.TemporaryDirectory(prefix="cadiff-s2p-bench-") as tmp:
            work = Path(tmp)
            cases = QUICK if a.quick else CASES
            rows = [row for case in cases for row in run_case(case, work)]
            demo, missing, mask, mask_missing = None, None, None, None
            if a.samples.is_dir() and any(a.samples.glob("*.tif")):
                demo = run_demo(a.samples, work, tau=cases[1].tau)
            else:
                missing = f"no TIFF samples in {a.samples} (run `make demo` first)"
            if a.mask_samples.is_dir() and any(a.mask_samples.glob("*.tif")) and a.mask_source.is_dir():
                mask = run_demo_mask(a.mask_samples, a.mask_source, work, tau=cases[1].tau, unconditional=a.samples)
            else:
                mask_missing = f"no TIFF samples in {a.mask_samples} or no {a.mask_source} (run `make demo` first)"
    except CadiffError as exc:
        print(f"suite2p_judge: error: {str(exc).splitlines()[0]}")
        return 2
    res = {
        "quick": a.quick, "total_s": time.perf_counter() - t0, "ceiling": rows, "demo": demo, "demo_missing": missing,
        "demo_mask": mask, "demo_mask_missing": mask_missing, "summary": summarize(rows, demo, mask),
        "meta": {"cpus": os.cpu_count(), "suite2p": importlib.metadata.version("suite2p"), "git": git_revision(),
                 "packages": package_versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }
    write_json_atomic(a.out.with_suffix(".json"), res)
    write_text_atomic(a.out.with_suffix(".md"), render_markdown(res))
    s = res["summary"]
    print(f"suite2p_judge: F1 two_photon {_fmt(s['two_photon_f1'])}, default {_fmt(s['default_f1'])}; demo density ratio "
          f"{_fmt(s['demo_density_ratio'])} ({res['total_s'] / 60:.1f} min) -> {a.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
