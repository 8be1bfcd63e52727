"""Helpers the test suite and the benchmarks share: the bad-input matrix, fault injection, tiny data."""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import Iterator

import torch

from cadiff.cli import run_job


def run_job_in_process(job: str, args: list[str]) -> subprocess.CompletedProcess:
    """A job through its entry point (``cadiff.cli.run_job``, what ``jobs/<job>.py`` calls) in this process,
    without an interpreter start-up: its exit code, stdout and stderr as a CompletedProcess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_job(job, list(args))
    return subprocess.CompletedProcess([job, *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, then give the caller's setting back. Bitwise comparisons need one
    thread: with more, a kernel's work split (and so its float sum order) follows the input's shape."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
