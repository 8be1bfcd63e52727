"""Bad-input matrix (issue 8; cases in :mod:`cadiff.testing.bad_inputs`): every case raises a specific cadiff
error naming the offending path/key and the expected form; the job entry point turns it into exit code 2, one
``cadiff <job>: error:`` line, no traceback (unless ``--verbose``) and no partial output.

Every case runs in process, both as the bare job main (the exception) and through the entry point the job
scripts call (exit code, output lines); a few representative cases also run as real job subprocesses.
"""

from __future__ import annotations

import subprocess

import pytest

from cadiff.errors import ConfigError
from cadiff.testing.bad_inputs import (
    CASES,
    Case,
    Env,
    case_negative_lr,
    check_cli,
    check_message,
    run_cli,
    run_entry_point,
    run_in_process,
)
from cadiff.testing.faults import snapshot

# one per failure family: a data file (prepare_data), a config key (train_ae), a missing export (sample)
CLI_CASES = ("truncated_tiff", "typo_config_key", "sample_missing_stage1")


# ---------------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def env(sim_data_root, stage1_run) -> Env:
    return Env(data_root=sim_data_root, stage1_run=stage1_run)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_specific_error(name, env, tmp_path):
    case = CASES[name](tmp_path, env)
    before = snapshot(case.guard)
    exc = run_in_process(case)
    assert type(exc) is case.error, f"{name}: {type(exc).__name__}: {exc}"
    assert not check_message(case, str(exc)), f"{name}: message lacks {check_message(case, str(exc))}: {exc}"
    assert snapshot(case.guard) == before, f"{name}: partial output left in {case.guard}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_through_the_job_entry_point(name, env, tmp_path):
    case = CASES[name](tmp_path, env)
    before = snapshot(case.guard)
    result = run_entry_point(case)
    problems = check_cli(case, result)
    assert not problems, f"{name}: {problems}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-2000:]}"
    assert snapshot(case.guard) == before, f"{name}: partial output left in {case.guard}"


@pytest.fixture(scope="module")
def cli_runs(env, tmp_path_factory) -> dict[str, tuple[Case, dict, subprocess.CompletedProcess, dict]]:
    """The representative cases through their job scripts, in parallel: ``name -> (case, before, result, after)``."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> tuple[Case, dict, subprocess.CompletedProcess, dict]:
        tmp = tmp_path_factory.mktemp(f"cli_{name}")
        case = CASES[name](tmp, env)
        before = snapshot(case.guard)
        result = run_cli(case, cwd=tmp)
        return case, before, result, snapshot(case.guard)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(CLI_CASES, pool.map(one, CLI_CASES)))


@pytest.mark.parametrize("name", CLI_CASES)
def test_bad_input_through_job_cli(name, cli_runs):
    case, before, result, after = cli_runs[name]
    problems = check_cli(case, result)
    assert not problems, f"{name}: {problems}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-2000:]}"
    assert after == before, f"{name}: partial output left in {case.guard}"


def test_verbose_adds_the_traceback_on_stderr(env, tmp_path):
    case = case_negative_lr(tmp_path, env)
    result = run_cli(case, cwd=tmp_path, verbose=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("cadiff train_ae: error:")
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_secret_override_is_not_echoed(tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"  # the shape of a wandb API key
    case = Case("train_ae", ["experiment=ae_tiny", f"logger.api_key={secret}"], ConfigError, [r"logger\.api_key"])
    result = run_cli(case, cwd=tmp_path)
    assert result.returncode == 2 and "logger.api_key" in result.stdout
    assert secret not in result.stdout + result.stderr
