"""Fault injection into real runs, shared by the fault-tolerance tests and ``benchmarks/reliability.py``.

Faults are injected from outside, like a real failure: a watcher thread reads the run folder (metrics.jsonl,
Ray Train's checkpoint snapshot) and signals processes that descend from the caller (never anyone else's);
storage damage is written into a file in place at equal size (a shard's payload, a checkpoint's header or
tensor data); in-process faults replace a function by one that raises on its n-th call (MemoryError, a full
disk). :func:`snapshot` and :func:`describe_kept` observe what a failure left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil

from cadiff import storage
from cadiff.errors import CadiffError
from cadiff.io import parse_jsonl
from cadiff.train.checkpoint import RAY_SNAPSHOT, CheckpointManager, step_of

REPO = Path(__file__).resolve().parents[2]  # the checkout: jobs/<job>.py are the command lines
SNAPSHOT = RAY_SNAPSHOT  # Ray Train V2's record of registered checkpoints


# ---------------------------------------------------------------------------------------------------------
# reading a live run folder


def metric_records(run_dir: str | Path) -> list[dict]:
    """Records of metrics.jsonl (a run folder or an object-store URI), in file order (a line being written is
    skipped); none before the file exists."""
    path = storage.join(run_dir, "metrics.jsonl")
    return parse_jsonl(storage.read_text(path)) if storage.is_file(path) else []


def metric_steps(run_dir: str | Path) -> list[int]:
    """Steps in metrics.jsonl (see :func:`metric_records`), in file order."""
    return [int(r["step"]) for r in metric_records(run_dir) if "step" in r]


def registered_step(run_dir: str | Path) -> int:
    """Step of the latest checkpoint Ray Train has registered (0 when none): the one a restart restores."""
    try:
        snap = json.loads(storage.read_text(storage.join(run_dir, "checkpoints", SNAPSHOT)))
        return int(snap["latest_checkpoint_result"]["checkpoint_dir_name"].split("_")[-1])
    except (OSError, CadiffError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def local_complete_step(run_dir: Path) -> int:
    """Step of the latest COMPLETE checkpoint written by strategy=single (0 when none)."""
    latest = CheckpointManager(run_dir).latest()
    return int(latest.name.split("_")[-1]) if latest is not None else 0


def resumed_from(steps: list[int]) -> list[int]:
    """Checkpoint steps the run restarted from: where the step sequence goes back, the step before the new one."""
    return [steps[i] - 1 for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]


def restarts_since(before: list[int], after: list[int]) -> list[int]:
    """:func:`resumed_from` for the steps a re-run appended: ``after`` is ``before`` plus that run's lines."""
    return resumed_from(after[max(len(before) - 1, 0):])


def train_workers(root_pid: int) -> list[psutil.Process]:
    """Ray Train worker processes started under ``root_pid`` (this test's cluster or job), oldest first."""
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found, key=lambda p: p.create_time())


def wait_until(condition: Callable[[], bool], timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``condition`` every 0.1 s until it holds (True), time runs out or ``alive()`` turns false (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        if condition():
            return True
        time.sleep(0.1)
    return False


def mid_interval(run_dir: Path, step_of_checkpoint: Callable[[Path], int]) -> Callable[[], bool]:
    """True once a checkpoint exists and training has gone past it (a kill now loses uncheckpointed steps)."""

    def check() -> bool:
        ckpt, steps = step_of_checkpoint(run_dir), metric_steps(run_dir)
        return ckpt > 0 and bool(steps) and steps[-1] > ckpt

    return check


class WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker under ``root_pid`` once ``run_dir`` is between two checkpoints (``ready``:
    another moment, such as a first checkpoint registered in an object store, where metrics arrive with it)."""

    def __init__(self, root_pid: int, run_dir: str | Path, timeout_s: float = 400,
                 ready: Callable[[], bool] | None = None) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.run_dir, self.timeout_s = root_pid, run_dir, timeout_s
        self.ready = ready or mid_interval(run_dir, registered_step)
        self.stop = threading.Event()
        self.killed: dict | None = None

    def run(self) -> None:
        ready = self.ready
        if not wait_until(lambda: ready() and len(train_workers(self.root_pid)) == 2, self.timeout_s,
                          alive=lambda: not self.stop.is_set()):
            return
        victim = train_workers(self.root_pid)[-1]
        self.killed = {"pid": victim.pid, "checkpoint": registered_step(self.run_dir),
                       "step": metric_steps(self.run_dir)[-1]}
        os.kill(victim.pid, signal.SIGKILL)


def run_with_worker_kill(cmd: list[str], cwd: Path, run_dir: str | Path, env: dict[str, str] | None = None,
                         timeout_s: float = 600, ready: Callable[[], bool] | None = None
                         ) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a job (its own local Ray: its raylet, hence its workers, descend from it) while a :class:`WorkerKiller`
    SIGKILLs one of its Ray Train workers between two checkpoints (or once ``ready()``); returns the finished job
    and the kill."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = WorkerKiller(proc.pid, run_dir, ready=ready)
    killer.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        killer.stop.set()
        killer.join()
        if proc.poll() is None:
            proc.kill()
            out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), killer.killed


def assert_worker_restored(run_dir: Path, killed: dict, ckpt_every: int) -> None:
    """After a :func:`run_with_worker_kill`: the victim is gone, the run restarted exactly once, from a registered
    checkpoint at or after the one seen at the kill (never step 0), and every step up to the last logged a
    finite loss."""
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    steps = metric_steps(run_dir)
    restarts = resumed_from(steps)
    assert len(restarts) == 1, f"expected one restart, steps {steps}, kill {killed}"
    assert restarts[0] >= killed["checkpoint"] > 0 and restarts[0] % ckpt_every == 0, (steps, killed)
    losses = {int(r["step"]): r["loss"] for r in metric_records(run_dir) if "loss" in r}
    assert sorted(losses) == list(range(1, steps[-1] + 1)), f"a step logged no loss: {sorted(losses)}"
    assert all(math.isfinite(v) for v in losses.values()), losses


def job_command(job: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / f"{job}.py"), *args]


def job_env(ray_address: str | None = None) -> dict[str, str]:
    """Environment of a job subprocess: its own local Ray, or the cluster at ``ray_address``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HYDRA_FULL_ERROR")}
    env.update(WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def _default_sigint() -> None:
    # a shell starts background commands with SIGINT ignored, and children inherit that: undo it for the job
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SHUTDOWN_GRACE_S = 30.0  # an interrupted driver's Ray processes leave within this after it exits
ORPHAN_GRACE_S = 2.0  # a SIGKILLed driver's: its local Ray's own reaper may still act in this


def interrupt_job(cmd: list[str], cwd: Path, run_dir: Path, sig: int, step_of_checkpoint: Callable[[Path], int],
                  timeout_s: float = 400, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Start a job, send ``sig`` to the driver alone between two checkpoints, wait for it to exit.

    Returns the finished process and what was seen when the signal went out. Processes of the job that
    outlive it (a Ray cluster the driver failed to stop) are reported in ``seen["survivors"]`` and killed. A
    catchable signal gives them :data:`SHUTDOWN_GRACE_S` to go; after SIGKILL no handler ran, so what is alive once
    the driver is gone stays orphaned: they get :data:`ORPHAN_GRACE_S` only.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)
    seen: dict = {}
    descendants: list[psutil.Process] = []
    try:
        if wait_until(mid_interval(run_dir, step_of_checkpoint), timeout_s, alive=lambda: proc.poll() is None):
            descendants = psutil.Process(proc.pid).children(recursive=True)
            seen = {"checkpoint": step_of_checkpoint(run_dir), "step": metric_steps(run_dir)[-1]}
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    grace = ORPHAN_GRACE_S if sig == signal.SIGKILL else SHUTDOWN_GRACE_S
    gone, survivors = psutil.wait_procs(descendants, timeout=grace)
    seen["survivors"] = [p.pid for p in survivors]
    for p in survivors:
        p.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seen


def run_twice_at_once(cmd: list[str], cwd: Path, run_dir: Path, env: dict[str, str] | None = None,
                      timeout_s: float = 400) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, dict]:
    """Start a job, and once it has logged a step run the same command again beside it (two runs of one
    ``run_name`` at once); wait for both. Returns the first, the second and what was seen: the first's ``pid``, the
    steps it had logged when the second started (``steps``) and ended (``steps_after_second``), and whether it was
    still running then."""
    env = env or job_env()
    first = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict = {"pid": first.pid}
    try:
        if not wait_until(lambda: bool(metric_steps(run_dir)), timeout_s, alive=lambda: first.poll() is None):
            out, err = first.communicate(timeout=timeout_s)
            missing = subprocess.CompletedProcess(cmd, -1, "", "not run: the first run logged no step")
            return subprocess.CompletedProcess(cmd, first.returncode, out, err), missing, seen
        seen["steps"] = metric_steps(run_dir)
        second = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
        seen["steps_after_second"] = metric_steps(run_dir)
        seen["first_alive_after_second"] = first.poll() is None
        out, err = first.communicate(timeout=timeout_s)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    return subprocess.CompletedProcess(cmd, first.returncode, out, err), second, seen


def corrupt_payload(shard: Path) -> str:
    """Overwrite the npy magic of the shard's first clip in place: tar headers stay valid, decoding fails."""
    with tarfile.open(shard, "r:") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".clip.npy"))
    with open(shard, "r+b") as fh:
        fh.seek(member.offset_data)
        fh.write(b"garbage!")
    return member.name


CORRUPTIONS = ("header", "tensor_data")
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), file name length, extra length


def corrupt_checkpoint_file(path: Path, where: str, nbytes: int = 4096) -> str:
    """Zero ``nbytes`` of a ``torch.save`` file in place, at equal size, as failing storage does.

    ``header``: its first bytes (the zip header: ``torch.load`` fails). ``tensor_data``: bytes inside its largest
    tensor's data (``torch.load`` succeeds with those values zeroed; only a content check notices). Returns
    what was damaged.
    """
    if where not in CORRUPTIONS:
        raise ValueError(f"where={where!r}: expected one of {CORRUPTIONS}")
    offset = 0
    if where == "tensor_data":
        with zipfile.ZipFile(path) as archive:
            member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
        if member.file_size < nbytes or member.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: largest tensor record {member.filename} is not {nbytes} stored bytes")
        with open(path, "rb") as fh:
            fh.seek(member.header_offset)
            _sig, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(fh.read(_ZIP_LOCAL_HEADER.size))
        offset = member.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    nbytes = min(nbytes, path.stat().st_size - offset)  # never past the end: the size must not change
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(nbytes))
    return f"{nbytes} bytes zeroed at offset {offset} of {path.name} ({where})"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The ``checkpoints/step_<n>`` folder of the highest step, whoever wrote it (cadiff or Ray Train)."""
    found = [p for p in (run_dir / "checkpoints").glob("step_*") if step_of(p) is not None]
    return max(found, key=step_of) if found else None


def rerun_after_damaging_latest(first: list[str], second: list[str], cwd: Path, run_dir: Path, where: str,
                                env: dict[str, str] | None = None, timeout_s: float = 600) -> dict:
    """Run job ``first`` (it must leave two checkpoints or more), then :func:`damage_latest_and_rerun` with
    ``second`` (the same run with more steps)."""
    env = env or job_env()
    done = subprocess.run(first, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or newest_checkpoint(run_dir) is None:
        return {"first_exit_code": done.returncode, "first_stderr": done.stderr[-2000:], "damaged": None}
    return damage_latest_and_rerun(second, cwd, run_dir, where, env=env, timeout_s=timeout_s)


def damage_latest_and_rerun(cmd: list[str], cwd: Path, run_dir: Path, where: str, env: dict[str, str] | None = None,
                            timeout_s: float = 600, latest: Path | None = None) -> dict:
    """Damage ``model.pt`` of the newest checkpoint of ``run_dir`` (or of ``latest``) at equal size
    (:func:`corrupt_checkpoint_file`), run ``cmd`` (the same run, more steps) and report what the re-run did: exit
    code, final line, the steps it restarted after, folders set aside, and the log lines about checkpoints that
    could not be resumed."""
    latest = latest or newest_checkpoint(run_dir)
    if latest is None:
        return {"damaged": None}
    damage = corrupt_checkpoint_file(latest / "model.pt", where)
    before = metric_steps(run_dir)
    rerun = subprocess.run(cmd, cwd=cwd, env=env or job_env(), capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in rerun.stdout.splitlines() if line.startswith("cadiff ")]
    return {"damaged": latest.name, "damage": damage, "exit_code": rerun.returncode, "line": lines[-1] if lines else "",
            "resumed_from": restarts_since(before, metric_steps(run_dir)),
            "set_aside": sorted(p.name for p in (run_dir / "checkpoints").glob(".corrupt_*")),
            "warnings": [line for line in (rerun.stdout + rerun.stderr).splitlines()
                         if "cannot be resumed" in line or "set aside as" in line],
            "stdout_tail": rerun.stdout[-2000:], "stderr_tail": rerun.stderr[-2000:]}


# ---------------------------------------------------------------------------------------------------------
# in-process faults


def fail_on_call(real: Callable, call: int, exc: BaseException) -> Callable:
    """``real``, except that its ``call``-th use raises ``exc`` (earlier ones work)."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise exc
        return real(*args, **kwargs)

    return failing


def disk_full_after(write_shards: Callable, samples_written: int) -> Callable:
    """A ``write_shards(samples, tree, split, ...)`` that gets ENOSPC after ``samples_written`` samples."""

    def writer(samples: Iterable, tree: Path, split: str, *args, **kwargs):
        def until_full() -> Iterator:
            for i, sample in enumerate(samples):
                if i == samples_written:
                    raise OSError(errno.ENOSPC, "No space left on device", str(tree / split / "clips-000005.tar"))
                yield sample

        return write_shards(until_full(), tree, split, *args, **kwargs)

    return writer


# ---------------------------------------------------------------------------------------------------------
# what a failure left behind


def snapshot(paths: list[Path]) -> dict[str, dict[str, str] | None]:
    """Content digest of every file under each guarded path (None for a path that does not exist)."""
    out: dict[str, dict[str, str] | None] = {}
    for path in paths:
        if not path.exists():
            out[str(path)] = None
            continue
        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        out[str(path)] = {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    return out


def describe_kept(path: Path, before: dict[str, str] | None) -> str:
    """What ``path`` holds now compared with its :func:`snapshot` entry ``before``, in a few words."""
    now = snapshot([path])[str(path)]
    if now is None:
        return f"{path.name} absent" + (" (it existed before: removed)" if before is not None else "")
    if now == before:
        return f"{path.name} byte-identical (sha256 of its {len(now)} files)"
    if before is None:
        return f"{path.name} created: {sorted(now)[:6]}"
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    return f"{path.name} CHANGED: {changed[:6]}"
