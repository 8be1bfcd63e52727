"""Ray Tune driver: every trial is a full Ray Train ``TorchTrainer`` run (Ray Train V2 pattern).

The Tune trainable is a function that composes the trial's config (base experiment + the user's overrides +
the sampled values), builds the same ``TorchTrainer`` as ``jobs/train_*.py`` with a ``TuneReportCallback``,
and fits it. Every trial validates with ``trainer.score=true``, so each report carries ``val_loss`` and the
stage's quality ``score`` (:mod:`cadiff.eval.score`); the sweep's ``metric`` (score | val_loss) picks which one
ASHA and the final ranking use. Outputs in ``<out_root>/sweep/<name>/``: results.csv, results.md (trials named
``t01``.., ranked best first, a column per swept key), metric_vs_params.png (a panel per swept parameter),
report.html (:mod:`cadiff.tune.report`: table, plots, per-trial curves), best.yaml, and the best config as
``<out_root>/experiments/experiment/<name>_best.yaml`` which ``jobs/train_*.py experiment=<name>_best`` picks up
(see ``cadiff.config.user_config_dirs``).

``chain.enabled=true`` (stage ae) scores the whole chain per trial - encode, stage-2 training, sampled and
decoded clips against held-out clips (:mod:`cadiff.tune.chain`) - and ``metric=chain_score`` ranks by it.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cadiff.config import compose
from cadiff.errors import CadiffError, ConfigError
from cadiff.io import atomic_path, write_text_atomic
from cadiff.runtime.preflight import check_cluster_paths, probe_cluster_paths, shared_paths
from cadiff.runtime.ray import init_ray, require_train_v2
from cadiff.train.launch import build_trainer, planned_run
from cadiff.train.stage import get_stage
from cadiff.tune.chain import CHAIN_KEYS, chain_settings, check_chain_data, check_stage2_config, run_chain
from cadiff.tune.report import column_names, fmt_value, write_sweep_report
from cadiff.tune.space import SearchSpace, apply_params, load_space, to_tune

log = logging.getLogger(__name__)

# CLI override prefixes forwarded from the sweep command line to every trial.
FORWARDED_PREFIXES = ("trainer.", "data.", "latents.", "seed=")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# CPUs one trial holds besides its Train workers: the trial function (TRIAL_CPUS), and a Ray Data decode task
# (``data.cpus_per_task`` / ``latents.cpus_per_task``, Ray's default 1). Without that CPU free, concurrent trials
# wait on each other's data tasks forever: on nodes smaller than a whole trial (function + a worker + a data
# task) each trial's worker takes a node the data tasks then cannot fit on.
TRIAL_CPUS = 0.01
# Per-trial metrics in the results table; either can rank the trials (sweep ``metric``). Whole-chain sweeps
# (``chain.enabled``) add CHAIN_KEYS, of which ``chain_score`` can rank.
RESULT_METRICS = ("score", "val_loss")
METRIC_MEANING = {
    "score": {"ae": "|1 - gain ratio| + latent_use of the val clips' reconstructions (cadiff.eval.score; lower is "
                    "better, comparable across objectives, time samplers and latent sizes)",
              "latent": "MMD^2 of sampled against val latents (cadiff.eval.score; lower is better, comparable across "
                        "objectives and DiT shapes trained on the same latents)"},
    "val_loss": {"ae": "each trial's own objective on the val clips (comparable only within one objective)",
                 "latent": "each trial's own objective on the val latents (comparable only within one objective)"},
    "chain_score": {"ae": "MMD^2 of clip statistics between held-out clips and the clips of the whole chain - a "
                          "stage-2 DiT trained on each trial's latents, sampled and decoded by the trial's decoder "
                          "(cadiff.tune.chain; lower is better, comparable across latent sizes)"},
}


def forwarded_overrides(argv: list[str]) -> list[str]:
    """The user's overrides that configure trials (``trainer.max_steps=3`` ...), in order."""
    return [a for a in argv if a.startswith(FORWARDED_PREFIXES)]


def trial_config(space: SearchSpace, sampled: dict[str, Any], trial_name: str, sweep: dict[str, Any]) -> Any:
    """Composed + validated config of one trial; every report carries the metric (ASHA needs it)."""
    # Tune runs each trial in its own working folder: data paths were made absolute on the driver
    overrides = apply_params(space.trial_overrides(sampled), sweep.get("data_roots", {})) + [
        f"run_name={trial_name}",
        f"out_root={sweep['trials_root']}",
        f"trainer.num_workers={sweep['workers_per_trial']}",
        f"trainer.cpus_per_worker={sweep['cpus_per_worker']}",
    ]
    cfg = compose(space.job, overrides)
    every = max(1, int(sweep["report_every"]))
    cfg.trainer.log_every = every
    cfg.trainer.val_every = every
    cfg.trainer.ckpt_every = cfg.trainer.max_steps
    cfg.trainer.score = True  # every trial reports val_loss and score, whichever ranks them
    return cfg


def run_trial(config: dict[str, Any], space: SearchSpace, sweep: dict[str, Any]) -> None:
    """Tune trainable: build and fit one TorchTrainer for the sampled ``config``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    sampled = {k: config[k] for k in space.params}
    trial_name = f"trial_{tune.get_context().get_trial_id()}"
    cfg = trial_config(space, sampled, trial_name, sweep)
    with planned_run(cfg, space.stage) as plan:
        result = build_trainer(plan, callbacks=[TuneReportCallback()]).fit()
    if sweep.get("chain"):
        # the last report: the stage-1 metrics again (the table reads one result per trial) and the chain's
        tune.report({**(result.metrics or {}), **run_chain(cfg, plan.location, sweep, trial_name)})


def _searcher(cfg: Any):
    if cfg.search != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.seed)


def _scheduler(cfg: Any, max_reports: int):
    if cfg.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t past the last report: a trial that runs to the end finishes on its own (export written, workers
    # released) instead of being stopped - killed - by the scheduler on its final report (a chain trial reports
    # once more, after its stage 2)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(max_reports, cfg.grace_period) + 1 + int(cfg.chain.enabled),
        grace_period=cfg.grace_period,
        reduction_factor=2,
    )


def run_sweep(cfg: Any, argv: list[str]) -> tuple[str, str]:
    """jobs/sweep.py: validate the space, run the Tune experiment, write table, plots and the best config."""
    require_train_v2()
    from ray import tune

    base = forwarded_overrides(argv)
    space = load_space(cfg.space, cfg.stage, experiment=cfg.experiment, overrides=base)
    probe = compose(space.job, space.trial_overrides({}))
    paths = shared_paths(probe, reads=[f"{get_stage(space.stage).data_key}.root"]) + shared_paths(cfg, writes=["out_root"])
    check_cluster_paths(cfg.ray, paths)  # before a relative root is resolved against this node's job working dir
    data_roots = absolute_data_roots(probe, space.stage)
    probe = compose(space.job, apply_params(space.trial_overrides({}), data_roots))
    name = cfg.name or f"{space.name}_{cfg.stage}"
    sweep_dir = (Path(cfg.out_root) / "sweep" / name).resolve()
    every = max(1, int(cfg.report_every))
    sweep = {
        "trials_root": str(sweep_dir / "trials"),
        "workers_per_trial": cfg.workers_per_trial,
        "cpus_per_worker": cfg.cpus_per_worker,
        "report_every": every,
        "data_roots": data_roots,
        "chain": chain_settings(cfg),
    }
    if sweep["chain"]:
        check_stage2_config(sweep["chain"], sweep)
    # Check (and prepare, for the default sim data) once here: before any trial, and not once per trial
    get_stage(space.stage).resolve(probe)
    if sweep["chain"]:
        check_chain_data(data_roots["data.root"])
    init_ray(cfg.ray, state_api=True)
    probe_cluster_paths(cfg.ray, paths)
    trainable = tune.with_resources(tune.with_parameters(run_trial, space=space, sweep=sweep), {"CPU": TRIAL_CPUS})
    storage = sweep_dir / "tune"
    experiment_path = storage / name
    if cfg.resume and tune.Tuner.can_restore(str(experiment_path)):
        tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(space, cfg.search),
            tune_config=tune.TuneConfig(
                metric=tune_metric(cfg),
                mode=cfg.mode,
                num_samples=cfg.num_samples,
                search_alg=_searcher(cfg),
                scheduler=_scheduler(cfg, math.ceil(probe.trainer.max_steps / every)),
                max_concurrent_trials=fit_concurrency(cfg),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                      callbacks=[_trial_table(space, cfg)]),
        )
    results = tuner.fit()
    return write_results(results, space, cfg, sweep_dir, probe.trainer.max_steps)


def tune_metric(cfg: Any) -> str:
    """The metric Tune's scheduler and searcher see on every report: ``chain_score`` exists only on a chain
    trial's last report, so the stage-1 ``score`` stands in for it during the trial (the final ranking is ours)."""
    return "score" if cfg.metric == "chain_score" else cfg.metric


def result_metrics(cfg: Any) -> tuple[str, ...]:
    """The per-trial metrics of the results table."""
    return RESULT_METRICS + (CHAIN_KEYS if cfg.chain.enabled else ())


def _trial_table(space: SearchSpace, cfg: Any) -> Any:
    # a ray.tune Callback: ray.tune is imported when a sweep runs, not with this module
    from cadiff.tune.status import TrialTable

    return TrialTable(list(space.params), cfg.metric, cfg.mode, cfg.status_every_s)


def fit_concurrency(cfg: Any) -> int:
    """``max_concurrent_trials`` lowered to what a local Ray cluster holds (workers + a data task per trial).

    A cluster reached through an address may autoscale, so its current size limits nothing there.
    """
    import ray

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return cfg.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 0.0)
    data_key, data_cpus = data_task_cpus(cfg)
    per_trial = TRIAL_CPUS + cfg.workers_per_trial * cfg.cpus_per_worker + data_cpus
    fits = int(cpus // per_trial)
    if fits < 1:
        raise ConfigError(
            f"workers_per_trial={cfg.workers_per_trial} x cpus_per_worker={cfg.cpus_per_worker} plus "
            f"{data_key}.cpus_per_task={data_cpus:g} for data loading needs {per_trial:g} CPUs per trial; the local "
            f"Ray cluster has {cpus:g} (lower cpus_per_worker / workers_per_trial / {data_key}.cpus_per_task or "
            "raise ray.num_cpus)"
        )
    if fits < cfg.max_concurrent_trials:
        log.warning(
            "max_concurrent_trials=%d lowered to %d: %g local CPUs hold %d trials of %g CPUs (workers + data)",
            cfg.max_concurrent_trials, fits, cpus, fits, per_trial,
        )
    return min(fits, cfg.max_concurrent_trials)


def data_task_cpus(cfg: Any) -> tuple[str, float]:
    """The trials' data config key (``data`` / ``latents``) and the CPUs each of their Ray Data tasks reserves."""
    key = get_stage(cfg.stage).data_key
    return key, float(OmegaConf.select(cfg, f"{key}.cpus_per_task"))


def absolute_data_roots(probe: Any, stage: str) -> dict[str, str]:
    """The trial data root as an absolute path (``data.root`` for stage ae, ``latents.root`` for latent)."""
    key = f"{get_stage(stage).data_key}.root"
    return {key: str(Path(OmegaConf.select(probe, key)).expanduser().resolve())}


def result_rows(results: Any, space: SearchSpace, cfg: Any, sweep_dir: Path,
                max_steps: int) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """One row per Tune result, named ``t01``.. in trial-id order, ranked by ``cfg.metric`` (best first; trials
    without a finite value last); and each named trial's training run folder (run_name trial_<id>, see run_trial)."""
    rows, trials = [], {}
    width = max(2, len(str(len(results))))
    ordered = sorted(results, key=lambda r: (str((r.metrics or {}).get("trial_id") or ""), str(r.path or "")))
    for index, r in enumerate(ordered, start=1):
        metrics = r.metrics or {}
        row = {"trial": f"t{index:0{width}d}", "rank": None, "status": "error" if r.error else "ok"}
        row.update({k: (r.config or {}).get(k) for k in space.params})
        row.update({k: metrics.get(k) for k in result_metrics(cfg)})
        row["steps"] = metrics.get("step")
        row["early_stopped"] = bool(metrics.get("step") is not None and metrics.get("step") < max_steps and not r.error)
        row["trial_id"] = metrics.get("trial_id")
        rows.append(row)
        if metrics.get("trial_id"):
            trials[row["trial"]] = sweep_dir / "trials" / space.job / f"trial_{metrics['trial_id']}"
    return rank_rows(rows, cfg.metric, cfg.mode), trials


def rank_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """``rows`` sorted best first by ``metric`` with ``rank`` 1..n set; rows without a finite value stay unranked, last."""
    scored = [r for r in rows if _finite(r.get(metric))]
    scored.sort(key=lambda r: r[metric], reverse=mode == "max")
    for number, row in enumerate(scored, start=1):
        row["rank"] = number
    return scored + [r for r in rows if not _finite(r.get(metric))]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def write_results(results: Any, space: SearchSpace, cfg: Any, sweep_dir: Path, max_steps: int) -> tuple[str, str]:
    """results.csv/.md, the metric-vs-parameter plot, report.html, best.yaml and the best experiment file."""
    rows, trials = result_rows(results, space, cfg, sweep_dir, max_steps)
    if not rows or rows[0]["rank"] is None:
        errors = "; ".join(" ".join(str(r.error).split())[-300:] for r in results if r.error)
        raise CadiffError(f"sweep {sweep_dir.name}: no trial reported '{cfg.metric}' ({errors or 'no results'})")
    best = rows[0]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ranked_by = f"Trials ranked by `{cfg.metric}` ({cfg.mode}): {METRIC_MEANING[cfg.metric][space.stage]}."
    if tune_metric(cfg) != cfg.metric and cfg.scheduler == "asha":
        ranked_by += f" ASHA's rungs compared the trials' stage-1 `{tune_metric(cfg)}`."
    _write_table(rows, space, sweep_dir, ranked_by)
    best_params = {k: best[k] for k in space.params}
    experiment_name = f"{sweep_dir.name}_best"
    best_file = Path(cfg.out_root).resolve() / "experiments" / "experiment" / f"{experiment_name}.yaml"
    text = best_experiment_yaml(space, best_params, best[cfg.metric], cfg.metric)
    write_text_atomic(best_file, text)
    write_text_atomic(sweep_dir / "best.yaml", text)
    experiments_dir = best_file.parent.parent
    # the written file must compose as an experiment from its folder (found by default under ./outputs)
    compose(space.job, [f"experiment={experiment_name}", f"hydra.searchpath=[file://{experiments_dir}]"])
    about = [f"space: `{space.name}` ({space.path}), stage {space.stage}, base experiment `{space.experiment}`",
             ranked_by]
    write_sweep_report(sweep_dir, rows, space.params, cfg.metric, cfg.mode, best, text, trials, about)
    stopped = sum(r["early_stopped"] for r in rows)
    summary = (
        f"{len(rows)} trials ({stopped} stopped early) best {cfg.metric}={best[cfg.metric]:.4g} "
        f"({best['trial']}) {best_params} experiment={experiment_name} "
        f"(CADIFF_CONFIG_PATH={experiments_dir} outside ./outputs)"
    )
    return summary, str(sweep_dir)


def best_experiment_yaml(space: SearchSpace, params: dict[str, Any], score: float, metric: str) -> str:
    """The base experiment with the best values set, as a standalone ``# @package _global_`` file."""
    base = OmegaConf.load(CONF_DIR / "experiment" / f"{space.experiment}.yaml")
    for override in space.base_overrides:
        key, _, value = override.partition("=")
        OmegaConf.update(base, key, yaml_value(value), force_add=True)
    for key, value in params.items():
        OmegaConf.update(base, key, value.item() if hasattr(value, "item") else value, force_add=True)
    header = (
        "# @package _global_\n"
        f"# Best trial of sweep space '{space.name}' (stage {space.stage}, base experiment {space.experiment}): "
        f"{metric}={score:.6g}\n"
    )
    return header + OmegaConf.to_yaml(base)


def yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _write_table(rows: list[dict[str, Any]], space: SearchSpace, sweep_dir: Path, ranked_by: str) -> None:
    """results.csv (full config keys) and results.md (``ranked_by``, then short column names)."""
    keys = list(rows[0])
    with atomic_path(sweep_dir / "results.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    headers = column_names(keys, list(space.params))
    lines = [ranked_by, "", "| " + " | ".join(headers[k] for k in keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(fmt_value(r[k]) for k in keys) + " |")
    write_text_atomic(sweep_dir / "results.md", "\n".join(lines) + "\n")
