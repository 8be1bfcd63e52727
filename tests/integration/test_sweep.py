"""Ray Tune sweeps (`jobs/sweep.py`): space validation before any trial, concurrency fitting, ASHA early stops,
results table / plot / best experiment, training the best experiment, and resuming a finished sweep.

The end-to-end test sweeps ``model.kl_weight`` over a grid: the KL term of a freshly initialised encoder is
about 0.05, so each grid step multiplies the validation loss gap (EMA weights barely move in 3 steps) and
the ranking is fixed. With 2 concurrent trials the 4th trial can only start after one of the first two has
finished, i.e. after a better loss is recorded at ASHA's first rung, so it is stopped there; that makes
"at least one trial stops early" deterministic rather than likely.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.testing import run_job_in_process

REPO = Path(__file__).resolve().parents[2]
SWEEP = str(REPO / "jobs" / "sweep.py")
KL_GRID = [0.0, 30.0, 300.0, 3000.0]
MAX_STEPS = 3


def _write_space(path: Path, params: dict, stage: str = "ae") -> Path:
    path.write_text(yaml.safe_dump({"stage": stage, "params": params}))
    return path


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("RAY_ADDRESS", None)  # each job starts its own local Ray
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _no_nan(constant: str) -> None:
    raise AssertionError(f"{constant} in a JSON file: expected strict JSON (null for a missing value)")


def _final_line(proc: subprocess.CompletedProcess, job: str) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"cadiff {job}:")]
    assert lines, f"no final line; rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------
# malformed spaces fail before any trial (no Ray)


BAD_SPACES = {
    "unknown_distribution": ({"trainer.lr": {"normal": [0.0, 1.0]}}, r"unknown distribution 'normal'"),
    "unknown_key": ({"model.not_a_key": {"choice": [1, 2]}}, r"'model.not_a_key' is not a config key of train_ae"),
    "low_above_high": ({"trainer.lr": {"loguniform": [1.0e-2, 1.0e-4]}}, r"low 0.01 >= high 0.0001"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_malformed_space_fails_before_any_trial(case, tmp_path):
    from cadiff.tune.sweep import run_sweep

    params, message = BAD_SPACES[case]
    space = _write_space(tmp_path / f"{case}.yaml", params)
    out_root = tmp_path / "out"
    cfg = compose("sweep", [f"space={space}", "stage=ae", f"out_root={out_root}", "trainer.max_steps=2"])
    with pytest.raises(ConfigError, match=message) as info:
        run_sweep(cfg, ["trainer.max_steps=2"])
    assert str(space) in str(info.value)
    assert not out_root.exists(), "a malformed space must fail before the sweep writes anything"


def test_malformed_space_cli_prints_one_line_error(tmp_path):
    space = _write_space(tmp_path / "bad.yaml", {"model.diffusion.shift": {"uniform": [4.0, 1.0]}})
    proc = _run([sys.executable, SWEEP, f"space={space}", "stage=ae", f"out_root={tmp_path / 'out'}"], tmp_path, 120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("cadiff sweep: error:")]
    assert len(errors) == 1 and "low 4.0 >= high 1.0" in errors[0] and str(space) in errors[0], proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == errors[0]
    # cadiff logs the dashboard of every local cluster it starts (Ray's own "Started a local Ray instance" is an
    # INFO line below ray.log_level)
    output = proc.stdout + proc.stderr
    assert "Ray dashboard:" not in output and "Started a local Ray instance" not in output, "Ray started for a malformed space"
    assert not (tmp_path / "out").exists()


def test_space_for_another_stage_is_rejected(tmp_path):
    from cadiff.tune.sweep import run_sweep

    space = _write_space(tmp_path / "dit.yaml", {"model.depth": {"int": [2, 4]}}, stage="latent")
    cfg = compose("sweep", [f"space={space}", "stage=ae", f"out_root={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="not stage 'ae'"):
        run_sweep(cfg, [])


CHAIN_BAD = {
    "metric_without_chain": (["metric=chain_score"], r"'metric' = 'chain_score': expected score or val_loss, or "
                             r"chain.enabled=true"),
    "chain_on_latent_stage": (["stage=latent", "chain.enabled=true"], r"'chain.enabled' = True: expected a stage=ae"),
    "too_few_samples": (["chain.enabled=true", "chain.samples=3"], r"'chain.samples' = 3: expected >= 4"),
}


@pytest.mark.parametrize("case", sorted(CHAIN_BAD))
def test_chain_config_is_checked_at_compose(case, tmp_path):
    args, message = CHAIN_BAD[case]
    with pytest.raises(ConfigError, match=message):
        compose("sweep", ["space=latent_size", "stage=ae", f"out_root={tmp_path}", *args])


def test_chain_stage2_override_fails_before_any_trial(tmp_path, monkeypatch):
    """A typo in the trials' stage-2 overrides is caught on the driver, before Ray starts or a trial trains."""
    from cadiff.tune.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    space = _write_space(tmp_path / "z.yaml", {"model.z_channels": {"choice": [2, 4]}})
    out_root = tmp_path / "out"
    cfg = compose("sweep", [f"space={space}", "stage=ae", f"out_root={out_root}", "chain.enabled=true",
                            "metric=chain_score", 'chain.overrides=["model.not_a_key=1"]'])
    with pytest.raises(ConfigError, match=r"train_latent: bad config or override: .*model.not_a_key"):
        run_sweep(cfg, [])
    assert not out_root.exists()


# ---------------------------------------------------------------------------------------------------------
# driver-side planning (no trials)


@pytest.mark.parametrize(
    ("cpus", "workers", "cpus_per_worker", "data_cpus", "wanted", "expected"),
    [(2.0, 1, 0.5, 1.0, 2, 1), (4.0, 1, 0.5, 1.0, 2, 2), (16.0, 1, 0.5, 1.0, 3, 3), (4.0, 2, 1.0, 1.0, 4, 1),
     (2.0, 1, 0.5, 0.25, 2, 2), (2.0, 1, 0.5, 0.5, 2, 1)],
)
def test_fit_concurrency_lowers_to_local_cpus(monkeypatch, cpus, workers, cpus_per_worker, data_cpus, wanted, expected):
    """A trial holds its function, its workers and a data task of data.cpus_per_task CPUs."""
    import ray

    from cadiff.tune.sweep import fit_concurrency

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    cfg = compose("sweep", [f"workers_per_trial={workers}", f"cpus_per_worker={cpus_per_worker}",
                            f"data.cpus_per_task={data_cpus}", f"max_concurrent_trials={wanted}"])
    assert fit_concurrency(cfg) == expected


def test_fit_concurrency_rejects_trials_larger_than_the_local_cluster(monkeypatch):
    import ray

    from cadiff.tune.sweep import fit_concurrency

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"workers_per_trial=2 x cpus_per_worker=1.0 plus data.cpus_per_task=1 "):
        fit_concurrency(compose("sweep", ["workers_per_trial=2", "cpus_per_worker=1.0"]))
    with pytest.raises(ConfigError, match=r"latents.cpus_per_task=2 for data loading needs 2.51 CPUs"):
        fit_concurrency(compose("sweep", ["stage=latent", "latents.cpus_per_task=2"]))
    # an addressed cluster may autoscale: its current size is no limit
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert fit_concurrency(compose("sweep", ["workers_per_trial=2", "max_concurrent_trials=3"])) == 3


def test_trial_config_uses_absolute_data_root_and_sweep_resources(tmp_path, monkeypatch):
    from cadiff.tune.space import load_space
    from cadiff.tune.sweep import absolute_data_roots, trial_config

    monkeypatch.chdir(tmp_path)  # Tune runs trials in other working folders: a relative root must not leak
    space_file = _write_space(tmp_path / "kl.yaml", {"model.kl_weight": {"grid": KL_GRID}})
    space = load_space(space_file, "ae", overrides=["data.root=rel/sim", "trainer.max_steps=3"])
    probe = compose(space.job, space.trial_overrides({}))
    roots = absolute_data_roots(probe, "ae")
    assert roots == {"data.root": str(tmp_path / "rel" / "sim")}
    sweep = {"trials_root": str(tmp_path / "t"), "workers_per_trial": 1, "cpus_per_worker": 0.25,
             "report_every": 1, "data_roots": roots}  # fmt: skip
    cfg = trial_config(space, {"model.kl_weight": 300.0}, "trial_x", sweep)
    assert cfg.data.root == str(tmp_path / "rel" / "sim") and cfg.model.kl_weight == 300.0
    assert (cfg.run_name, cfg.out_root, cfg.trainer.num_workers, cfg.trainer.cpus_per_worker) == (
        "trial_x", str(tmp_path / "t"), 1, 0.25
    )
    assert cfg.trainer.max_steps == 3 and cfg.trainer.val_every == 1 and cfg.trainer.log_every == 1


def test_results_report_has_the_plot_and_each_trial_curves_from_its_run_folder(tmp_path):
    """write_results without Ray: Tune's results stand in; each trial's run folder is found by its trial_id."""
    from types import SimpleNamespace

    from cadiff.tune.space import load_space
    from cadiff.tune.sweep import write_results

    space = load_space(_write_space(tmp_path / "kl.yaml", {"model.kl_weight": {"grid": KL_GRID}}), "ae")
    sweep_dir = tmp_path / "out" / "sweep" / "kl"
    results = []
    for i, kl in enumerate(KL_GRID):
        run_dir = sweep_dir / "trials" / "train_ae" / f"trial_t{i}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(
            f'{{"step": {s}, "loss": {1 / s + kl}, "val_loss": {1 / s + kl}, "score": {1 / s - kl}}}\n' for s in (1, 2, 3)))
        results.append(SimpleNamespace(metrics={"val_loss": 1 / 3 + kl, "score": 1 / 3 - kl, "step": 3, "trial_id": f"t{i}"},
                                       config={"model.kl_weight": kl}, path=str(tmp_path / f"run_trial_t{i}"), error=None))
    cfg = compose("sweep", ["metric=val_loss", "mode=min", f"out_root={tmp_path / 'out'}"])
    summary, path = write_results(results, space, cfg, sweep_dir, MAX_STEPS)
    report = (sweep_dir / "report.html").read_text()
    assert path == str(sweep_dir) and "best val_loss=0.3333" in summary
    assert report.count("<img") == 2 and "<td>t01</td>" in report and "<th>#</th>" in report  # plot + curves
    assert "<th>kl_weight</th>" in report and "<th>score</th>" in report and "ranked by <code>val_loss</code>" in report
    assert "No trial left a metrics.jsonl" not in report
    table = (sweep_dir / "results.md").read_text().splitlines()
    assert table[0].startswith("Trials ranked by `val_loss` (min)")
    assert table[2].startswith("| trial | rank | status | kl_weight | score | val_loss |") and "| t01 | 1 |" in table[4]
    # ranked by score instead, the order reverses and best.yaml follows it
    cfg.metric = "score"
    summary, _ = write_results(results, space, cfg, sweep_dir, MAX_STEPS)
    assert "best score=-3000 (t04)" in summary and "| t04 | 1 |" in (sweep_dir / "results.md").read_text()
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["model"]["kl_weight"] == 3000.0
    # a whole-chain sweep ranks by chain_score; a trial ASHA stopped during stage 1 has none and ranks last
    for result, chain in zip(results, (0.5, 0.1, None, 0.3)):
        if chain is not None:
            result.metrics.update(chain_score=chain, chain_mmd2_split_half=0.01, chain_gain_ratio=1.0)
    cfg = compose("sweep", ["metric=chain_score", "chain.enabled=true", f"out_root={tmp_path / 'out'}"])
    summary, _ = write_results(results, space, cfg, sweep_dir, MAX_STEPS)
    table = (sweep_dir / "results.md").read_text().splitlines()
    assert "best chain_score=0.1 (t02)" in summary
    assert table[0].startswith("Trials ranked by `chain_score` (min)") and "stage-1 `score`" in table[0]
    assert "| chain_score | chain_mmd2_split_half | chain_gain_ratio |" in table[2]
    assert [line.split(" | ")[:2] for line in table[4:]] == [["| t02", "1"], ["| t04", "2"], ["| t01", "3"], ["| t03", "-"]]
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["model"]["kl_weight"] == 30.0


# ---------------------------------------------------------------------------------------------------------
# end to end: a real sweep on a local Ray cluster


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_asha_table_plot_best_experiment_trains_and_resumes(ray_cluster, tmp_path, monkeypatch):
    """The sweep job on the suite's shared Ray cluster (the job joins a running cluster as it would join
    ``ray.address``; `jobs/sweep.py` itself, with its own local Ray, is run by test_malformed_space_cli_*)."""
    monkeypatch.chdir(tmp_path)
    space = _write_space(tmp_path / "kl.yaml", {"model.kl_weight": {"grid": KL_GRID}})
    out_root = tmp_path / "sweeps"
    # no data.root: the default outputs/data/sim (relative to the working folder) is prepared on the fly
    # val_loss ranks: its KL gap makes ASHA's stop deterministic; every trial still reports its score
    args = [f"space={space}", "stage=ae", "search=grid", "num_samples=1", "name=kl", "max_concurrent_trials=2", "metric=val_loss",
            "workers_per_trial=1", "cpus_per_worker=0.5", "grace_period=1", "report_every=1",
            f"trainer.max_steps={MAX_STEPS}", f"out_root={out_root}"]
    proc = run_job_in_process("sweep", args)
    final = _final_line(proc, "sweep")
    assert proc.returncode == 0, final
    sweep_dir = out_root / "sweep" / "kl"
    assert final.endswith(f"-> {sweep_dir}"), final
    assert (tmp_path / "outputs" / "data" / "sim" / "index.json").is_file()

    with open(sweep_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {float(r["model.kl_weight"]) for r in rows} == set(KL_GRID)
    assert all(r["status"] == "ok" for r in rows), rows
    by_kl = {float(r["model.kl_weight"]): r for r in rows}
    worst, best = by_kl[KL_GRID[-1]], by_kl[KL_GRID[0]]
    assert worst["early_stopped"] == "True" and int(worst["steps"]) < MAX_STEPS, worst
    assert best["early_stopped"] == "False" and int(best["steps"]) == MAX_STEPS, best
    stopped = sum(r["early_stopped"] == "True" for r in rows)
    assert f"4 trials ({stopped} stopped early)" in final and stopped >= 1
    assert float(best["val_loss"]) == min(float(r["val_loss"]) for r in rows)
    assert all(float(r["score"]) >= 0 for r in rows) and [r["trial"] for r in rows] != [""] * 4

    table = (sweep_dir / "results.md").read_text().strip().splitlines()
    assert table[0].startswith("Trials ranked by `val_loss` (min)") and len(table) == 4 + 4
    assert table[2].startswith("| trial | rank | status | kl_weight | score | val_loss") and "| 1 | ok | 0 |" in table[4]
    png = sweep_dir / "metric_vs_params.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100
    report = (sweep_dir / "report.html").read_text()
    assert report.count("<img") == 2 and "kl_weight" in report  # the plot and the per-trial curves

    best_file = out_root / "experiments" / "experiment" / "kl_best.yaml"
    text = best_file.read_text()
    assert text == (sweep_dir / "best.yaml").read_text() and text.startswith("# @package _global_")
    assert yaml.safe_load(text)["model"]["kl_weight"] == 0.0

    # the best experiment trains, found through the search path the sweep printed
    config_path = re.search(r"CADIFF_CONFIG_PATH=(\S+)", final).group(1)
    assert Path(config_path) == out_root / "experiments"
    monkeypatch.setenv("CADIFF_CONFIG_PATH", config_path)
    trained = run_job_in_process("train_ae", ["experiment=kl_best", "run_name=best", f"out_root={tmp_path / 'train'}",
                                       "trainer.max_steps=1", "strategy=single", "trainer.num_workers=1"])
    line = _final_line(trained, "train_ae")
    assert trained.returncode == 0 and line.startswith("cadiff train_ae: ok step=1"), line
    run_dir = tmp_path / "train" / "train_ae" / "best"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["model"]["kl_weight"] == 0.0 and recorded["model"]["z_channels"] == 4
    assert (run_dir / "export" / "model.pt").is_file()

    # resume=true restores the finished experiment: the same 4 trials, none re-run
    trial_dirs = sorted(p.name for p in (sweep_dir / "trials" / "train_ae").iterdir())
    resumed = run_job_in_process("sweep", [*args, "resume=true"])
    again = _final_line(resumed, "sweep")
    assert resumed.returncode == 0 and "4 trials" in again and "'model.kl_weight': 0.0" in again, again
    assert sorted(p.name for p in (sweep_dir / "trials" / "train_ae").iterdir()) == trial_dirs


@pytest.mark.slow
@pytest.mark.ray
def test_chain_sweep_scores_every_latent_size_through_stage2_in_pixels(ray_cluster, sim_data_root, tmp_path,
                                                                          monkeypatch):
    """chain.enabled: every trial encodes the data with its own autoencoder, trains a DiT on those latents,
    samples and decodes clips, and is ranked by their MMD^2 against held-out clips (chain_score)."""
    monkeypatch.chdir(tmp_path)
    z_grid = [2, 4]
    space = _write_space(tmp_path / "z.yaml", {"model.z_channels": {"grid": z_grid}})
    out_root = tmp_path / "sweeps"
    args = [f"space={space}", "stage=ae", "search=grid", "num_samples=1", "name=chain", "max_concurrent_trials=2",
            "scheduler=none", "metric=chain_score", "chain.enabled=true", "chain.max_steps=1", "chain.samples=4",
            "workers_per_trial=1", "cpus_per_worker=0.5", "trainer.max_steps=1", f"data.root={sim_data_root}",
            f"out_root={out_root}", 'chain.overrides=["strategy=single"]']  # stage 2 in the trial's own process
    proc = run_job_in_process("sweep", args)
    final = _final_line(proc, "sweep")
    assert proc.returncode == 0, final + proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_dir = out_root / "sweep" / "chain"
    with open(sweep_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), rows
    assert sorted(int(r["model.z_channels"]) for r in rows) == z_grid
    scores = [float(r["chain_score"]) for r in rows]
    assert all(math.isfinite(v) for v in scores) and scores == sorted(scores), rows  # ranked best first
    assert [r["rank"] for r in rows] == ["1", "2"]
    for row in rows:
        assert float(row["chain_gain_ratio"]) > 0 and math.isfinite(float(row["chain_mmd2_split_half"])), row
        assert math.isfinite(float(row["score"])) and int(row["steps"]) == 1, row  # stage 1's own report kept
        trial = f"trial_{row['trial_id']}"
        # the trial's latents come from its own encoder, its stage 2 trained on them and wrote the chain's keys
        latent_index = json.loads((sweep_dir / "trials" / "latents" / trial / "index.json").read_text())
        assert latent_index["latent_shape"][0] == int(row["model.z_channels"])
        assert Path(latent_index["stage1"]).is_relative_to(sweep_dir / "trials" / "train_ae" / trial)
        stage2 = sweep_dir / "trials" / "train_latent" / trial
        assert (stage2 / "export" / "model.pt").is_file()
        stage2_cfg = yaml.safe_load((stage2 / "config.yaml").read_text())  # chain.overrides reached stage 2
        assert stage2_cfg["strategy"]["name"] == "single" and stage2_cfg["trainer"]["max_steps"] == 1
        chain = json.loads((stage2 / "chain.json").read_text(), parse_constant=_no_nan)  # strict JSON
        assert chain["chain_score"] == pytest.approx(float(row["chain_score"]), rel=1e-4) and chain["samples"] == 4
    table = (sweep_dir / "results.md").read_text().splitlines()
    assert table[0].startswith("Trials ranked by `chain_score` (min)") and "chain_score" in table[2]
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["model"]["z_channels"] == int(rows[0]["model.z_channels"])
    assert "best chain_score=" in final
