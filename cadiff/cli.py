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

from omegaconf import OmegaConf

from cadiff.config import compose
from cadiff.errors import CadiffError
from cadiff.help import job_help, jobs_help
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
    if "--help" in args or "-h" in args:
        print(job_help(job))
        return 0
    show_cfg = _pop_cfg_flag(args)
    verbose = "--verbose" in args or os.environ.get("HYDRA_FULL_ERROR") == "1"
    args = [a for a in args if a != "--verbose"]
    if "verbose=true" in args:
        verbose = True
    setup_logging(verbose)
    ray_before = _ray_running()
    try:
        if show_cfg:  # the composed, typed config as the job would see it; its rules are checked when it runs
            print(OmegaConf.to_yaml(compose(job, args, validate=False)), end="")
            return 0
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


def _pop_cfg_flag(args: list[str]) -> bool:
    """Remove Hydra's ``--cfg job`` (also ``--cfg=job``, ``-c job``) from ``args``; True when it was there."""
    for i, arg in enumerate(args):
        if arg in ("--cfg", "-c") and i + 1 < len(args) and args[i + 1] in ("job", "all"):
            del args[i : i + 2]
            return True
        if arg in ("--cfg=job", "--cfg=all"):
            del args[i]
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """The ``cadiff`` console command: ``cadiff <job> key=value ...``; ``cadiff --help`` lists the jobs."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("--help", "-h", "help"):
        print(jobs_help())
        return 0 if args else 2
    job, rest = args[0], args[1:]
    if job not in JOBS:
        print(f"cadiff: error: unknown job {job!r}; expected one of {list(JOBS)} (cadiff --help)", flush=True)
        return 2
    return run_job(job, rest)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _shutdown_ray() -> None:
    """Stop the Ray session the job started, so worker log lines cannot follow the final summary line."""
    if _ray_running():
        sys.modules["ray"].shutdown()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def console() -> None:
    """Entry point of the ``cadiff`` command (pyproject ``[project.scripts]``)."""
    sys.exit(main())


def main_for(job: str) -> None:
    """``if __name__ == "__main__": main_for("train_ae")`` in a job script."""
    sys.exit(run_job(job))
