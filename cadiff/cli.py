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

from cadiff.config import compose
from cadiff.errors import CadiffError
from cadiff.jobs import JOBS, JobMain

log = logging.getLogger("cadiff")



def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_job(job: str, argv: list[str] | None = None, main: JobMain | None = None) -> int:
    """Run ``job`` (its main from :data:`cadiff.jobs.JOBS` unless given) with Hydra overrides from ``argv``;
    print the one final line and return the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    main = main or JOBS[job]
    verbose = "--verbose" in args or os.environ.get("HYDRA_FULL_ERROR") == "1"
    args = [a for a in args if a != "--verbose"]
    if "verbose=true" in args:
        verbose = True
    setup_logging(verbose)
    ray_before = _ray_running()
    try:
        cfg = compose(job, args)
        try:
            summary, path = main(cfg, args)
        finally:
            if not ray_before:
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


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _shutdown_ray() -> None:
    """Stop the Ray session the job started, so worker log lines cannot follow the final summary line."""
    if _ray_running():
        sys.modules["ray"].shutdown()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main_for(job: str) -> None:
    """``if __name__ == "__main__": main_for("train_ae")`` in a job script."""
    sys.exit(run_job(job))
