"""Shared entry-point wrapper for ``jobs/*.py``: compose + validate the config, run, print one final line.

Every job prints ``cadiff <job>: ok <key results> -> <path>`` on success and a one-line
``cadiff <job>: error: ...`` (exit 2 for bad input/config, 1 for anything else) on failure. ``--verbose``
or ``HYDRA_FULL_ERROR=1`` adds the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from cadiff.config import compose
from cadiff.errors import CadiffError

log = logging.getLogger("cadiff")

JobResult = tuple[str, str]  # (key results, output path)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_job(job: str, main: Callable[[Any], JobResult], argv: list[str] | None = None) -> int:
    """Run ``main(cfg)`` for ``job`` with Hydra overrides from ``argv``; return the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or os.environ.get("HYDRA_FULL_ERROR") == "1"
    args = [a for a in args if a != "--verbose"]
    if "verbose=true" in args:
        verbose = True
    setup_logging(verbose)
    try:
        cfg = compose(job, args)
        try:
            summary, path = main(cfg)
        finally:
            _shutdown_ray()
    except CadiffError as exc:
        if verbose:
            traceback.print_exc()
        print(f"cadiff {job}: error: {_one_line(exc)}", flush=True)
        return 2
    except (KeyboardInterrupt, SystemExit):
        # SystemExit: Ray Train's SIGINT/SIGTERM handler ends a graceful abort with sys.exit
        print(f"cadiff {job}: error: interrupted; re-run the same command to resume", flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into one line
        if verbose:
            traceback.print_exc()
        print(f"cadiff {job}: error: {type(exc).__name__}: {_one_line(exc)} (re-run with --verbose for a traceback)", flush=True)
        return 1
    print(f"cadiff {job}: ok {summary} -> {path}", flush=True)
    return 0


def _shutdown_ray() -> None:
    """Stop a Ray session the job started, so worker log lines cannot follow the final summary line."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main_for(job: str, main: Callable[[Any], JobResult]) -> None:
    """``if __name__ == "__main__": main_for("train_ae", run)`` in a job script."""
    sys.exit(run_job(job, main))
