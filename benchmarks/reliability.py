"""Reliability report (issue 8): inject faults into real runs and feed the bad-input matrix to the job CLIs,
then record what actually happened in ``benchmarks/results/reliability.json`` and ``reliability.md``.

Faults (on a local Ray cluster this script starts; jobs run as subprocesses connected to it):
- a Ray Train worker SIGKILLed between two checkpoints: DDP and DeepSpeed ZeRO-2 with ``trainer.max_failures=1``
  (expected: restore from the latest registered checkpoint, finish, valid export), and DDP with
  ``max_failures=0`` (expected: one-line error, no export; re-running the same command resumes);
- the driver SIGTERMed (Ray DDP) or SIGINTed (strategy=single, plus a half-written newer checkpoint) and re-run;
- the same training command started again while its run trains (expected: the second refused with one line
  naming the first's process, the first undisturbed);
- a crash inside a checkpoint write, and a committed checkpoint truncated afterwards (CheckpointManager);
- the newest checkpoint damaged at equal size (zip header or 4 KiB of tensor data zeroed), then the run re-run:
  strategy=single and DDP (expected: sha256 check fails, WARNING, resume from the previous one, damaged one kept
  as ``.corrupt_step_<n>``);
- a shard corrupted mid-stream (tar headers intact) under ``corrupt_shards=fail|skip``, Ray Data and the
  deterministic path.
Faults that need no Ray (also under ``--skip-ray``; in-process, real code):
- downloads from a loopback HTTP server (``cadiff.testing.http_server``): closed early without Content-Length
  (nothing cached), closed early with it (``.part`` kept, the next fetch resumes it), a re-download whose sha256
  differs from the trust-on-first-use record (refused, lock file unchanged); a zip bomb (nothing extracted);
- prepare_data ``overwrite=true`` over complete data failing mid-way: ENOSPC from the shard writer, MemoryError
  reading a recording (the earlier data byte-identical, no build folder left);
- metrics.jsonl ending in a torn line, opened by the resumed run's MetricsWriter (complete lines kept).
Bad inputs: every case of ``cadiff.testing.bad_inputs`` in-process (exception class, message) and through its
job CLI (exit code, one line, no traceback) - among them prepare_data over earlier data with another fingerprint
and no overwrite, and overwrite=true with a NaN frame.

Each section is one matrix: input or fault | setup | observed one-line message | what was kept | outcome | time.
"What was kept" is observed afterwards (files hashed before and after, folders listed), never a fixed string.

    python benchmarks/reliability.py                 # ~10-20 min on 2 shared cores
    python benchmarks/reliability.py --skip-ray      # bad inputs + the faults that need no Ray Train run
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.bench import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = ["experiment=ae_tiny", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5", "trainer.log_every=1",
         "ema.decay=0.9"]


def _export_step(run_dir: Path) -> int | None:
    from cadiff.errors import CheckpointError
    from cadiff.runtime.exports import load_export

    try:
        return int(load_export(run_dir / "export" / "model.pt")[2]["step"])
    except CheckpointError:
        return None


def _run_kept(run_dir: Path) -> str:
    """What a run folder holds afterwards: its checkpoint folders (set-aside ones too) and its export's step."""
    folder = run_dir / "checkpoints"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []
    step = _export_step(run_dir)
    return f"checkpoints {names or 'none'}; export {'absent' if step is None else f'of step {step}'}"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("cadiff ")]
    return lines[-1] if lines else (text.strip().splitlines() or [""])[-1]


# ---------------------------------------------------------------------------------------------------------
# faults


def fault_worker_kill(ctx: dict, strategy: str, max_failures: int) -> dict:
    """SIGKILL one Ray Train worker between two checkpoints; with no retries left, re-run the command."""
    from cadiff.testing.faults import (
        WorkerKiller,
        job_command,
        job_env,
        metric_steps,
        resumed_from,
    )

    tmp, max_steps = ctx["tmp"] / f"kill_{strategy}_{max_failures}", 12
    run_dir = tmp / "train_ae" / "r"
    cmd = job_command("train_ae", *TRAIN, f"strategy={strategy}", f"data.root={ctx['data_root']}", f"out_root={tmp}",
                      "run_name=r", f"trainer.max_steps={max_steps}", "trainer.val_every=12", "trainer.ckpt_every=3",
                      f"trainer.max_failures={max_failures}")
    killer = WorkerKiller(os.getpid(), run_dir)
    killer.start()
    first = subprocess.run(cmd, cwd=ctx["tmp"], env=job_env(ctx["ray_address"]), capture_output=True, text=True,
                           timeout=900)
    killer.stop.set()
    killer.join()
    row = {"killed": killer.killed, "exit_code": first.returncode, "line": _last_line(first.stdout)}
    if max_failures == 0:
        row["export_after_failure"] = (run_dir / "export").exists()
        second = subprocess.run(cmd, cwd=ctx["tmp"], env=job_env(ctx["ray_address"]), capture_output=True, text=True,
                                timeout=900)
        row.update(rerun_exit_code=second.returncode, rerun_line=_last_line(second.stdout))
    steps = metric_steps(run_dir)
    row.update(steps=steps, resumed_from=resumed_from(steps), export_step=_export_step(run_dir), kept=_run_kept(run_dir))
    ok_restore = (killer.killed is not None and len(row["resumed_from"]) == 1
                  and row["resumed_from"][0] >= killer.killed["checkpoint"] > 0 and steps.count(1) == 1
                  and row["export_step"] == max_steps)
    if max_failures == 0:
        row["passed"] = (ok_restore and first.returncode != 0 and first.stdout.count("cadiff train_ae: error:") == 1
                         and not row["export_after_failure"] and row["rerun_exit_code"] == 0)
        row["observed"] = (f"killed pid {killer.killed and killer.killed['pid']} at step {killer.killed and killer.killed['step']}"
                           f"; run failed (exit {first.returncode}, one line, no export); re-run resumed from step "
                           f"{row['resumed_from']} and exported step {row['export_step']}")
    else:
        row["passed"] = ok_restore and first.returncode == 0
        row["observed"] = (f"killed pid {killer.killed and killer.killed['pid']} at step {killer.killed and killer.killed['step']}"
                           f" (checkpoint {killer.killed and killer.killed['checkpoint']} registered); restarted from step "
                           f"{row['resumed_from']}, finished, export step {row['export_step']}")
    return row


def fault_driver_signal(ctx: dict, sig: int) -> dict:
    """Interrupt the driver between checkpoints (SIGTERM: Ray DDP; SIGINT: strategy=single), then re-run."""
    from cadiff.testing.faults import (
        interrupt_job,
        job_command,
        job_env,
        local_complete_step,
        metric_steps,
        registered_step,
        resumed_from,
    )

    name = signal.Signals(sig).name
    tmp = ctx["tmp"] / f"driver_{name}"
    run_dir = tmp / "train_ae" / "r"
    if sig == signal.SIGTERM:
        max_steps, probe, env = 6, registered_step, job_env(ctx["ray_address"])
        args = [*TRAIN, "strategy=ddp", "trainer.ckpt_every=2", "trainer.val_every=6"]
    else:
        max_steps, probe, env = 16, local_complete_step, job_env()
        args = ["experiment=ae_tiny", "strategy=single", "trainer.num_workers=1", "trainer.log_every=1",
                "trainer.ckpt_every=4", "trainer.val_every=16", "trainer.threads_per_worker=1"]
    cmd = job_command("train_ae", *args, f"trainer.max_steps={max_steps}", f"data.root={ctx['data_root']}",
                      f"out_root={tmp}", "run_name=r")
    first, seen = interrupt_job(cmd, ctx["tmp"], run_dir, sig, probe, timeout_s=900, env=env)
    good = probe(run_dir)  # the checkpoint a re-run must resume from
    partial = None
    if sig == signal.SIGINT and good:
        partial = run_dir / "checkpoints" / f".tmp_step_{good + 4:08d}"  # a crash while writing the next one
        partial.mkdir()
        (partial / "model.pt").write_bytes(b"\x80truncated")
    second = subprocess.run(cmd, cwd=ctx["tmp"], env=env, capture_output=True, text=True, timeout=900)
    steps = metric_steps(run_dir)
    restarts = resumed_from(steps)
    row = {"seen": seen, "exit_code": first.returncode, "line": _last_line(first.stdout),
           "rerun_exit_code": second.returncode, "rerun_line": _last_line(second.stdout), "steps": steps,
           "resumed_from": restarts, "export_step": _export_step(run_dir),
           "partial_checkpoint_cleaned": None if partial is None else not partial.exists(),
           "kept": _run_kept(run_dir)}
    row["passed"] = (seen.get("checkpoint", 0) > 0 and first.returncode == 130
                     and row["line"] == "cadiff train_ae: error: interrupted; re-run the same command to resume"
                     and not seen.get("survivors") and second.returncode == 0 and steps.count(1) == 1
                     and restarts in ([good], [])
                     and row["export_step"] == max_steps and row["partial_checkpoint_cleaned"] is not False)
    row["observed"] = (f"{name} at step {seen.get('step')} (checkpoint {seen.get('checkpoint')}): exit "
                       f"{first.returncode}, '{row['line']}', {len(seen.get('survivors', []))} orphan processes; "
                       f"re-run resumed after step {restarts or seen.get('checkpoint')}, export step {row['export_step']}"
                       + ("; half-written newer checkpoint ignored and removed" if row["partial_checkpoint_cleaned"] else ""))
    return row


def fault_same_run_twice(ctx: dict) -> dict:
    """The same training command started again while its run trains (strategy=single): the second is refused."""
    from cadiff.testing.faults import job_command, metric_steps, run_twice_at_once

    tmp, max_steps = ctx["tmp"] / "twice", 24
    run_dir = tmp / "train_ae" / "r"
    cmd = job_command("train_ae", "experiment=ae_tiny", "strategy=single", "trainer.num_workers=1",
                      "trainer.log_every=1", "trainer.ckpt_every=12", f"trainer.val_every={max_steps}",
                      "trainer.threads_per_worker=1", f"trainer.max_steps={max_steps}", f"data.root={ctx['data_root']}",
                      f"out_root={tmp}", "run_name=r")
    first, second, seen = run_twice_at_once(cmd, ctx["tmp"], run_dir, timeout_s=900)
    second_lines = second.stdout.splitlines()
    steps = metric_steps(run_dir)
    lock_left = (run_dir / ".cadiff.lock").exists()
    row = {"seen": seen, "exit_code": first.returncode, "line": _last_line(first.stdout),
           "second_exit_code": second.returncode, "second_line": _last_line(second.stdout), "steps": steps,
           "export_step": _export_step(run_dir), "kept": _run_kept(run_dir)}
    row["passed"] = (bool(seen.get("first_alive_after_second")) and second.returncode == 2 and len(second_lines) == 1
                     and f"is in use by process {seen['pid']}" in second_lines[0] and "Traceback" not in second.stderr
                     and first.returncode == 0 and steps == list(range(1, max_steps + 1))
                     and row["export_step"] == max_steps and not lock_left)
    row["message"] = row["second_line"].split(": error: ", 1)[-1][:240]
    row["observed"] = row["message"]
    row["kept"] = (f"second run: exit {second.returncode}, {len(second_lines)} output line(s); first run: exit "
                   f"{first.returncode}, metrics.jsonl steps {steps[0] if steps else '-'}..{steps[-1] if steps else '-'}"
                   f" in {len(steps)} lines, {row['kept']}, lock {'left behind' if lock_left else 'released'}")
    return row


def fault_checkpoint_write_crash(ctx: dict) -> dict:
    """Crash between writing a checkpoint and committing it; then truncate the newest committed file."""
    import torch

    from cadiff.runtime.exports import safe_load
    from cadiff.train.checkpoint import CheckpointManager

    manager = CheckpointManager(ctx["tmp"] / "ckpt_crash", num_to_keep=2)
    for step in (1, 2):
        tmp = manager.tmp_dir(step)
        torch.save({"w": torch.full((64,), float(step))}, tmp / "model.pt")
        manager.commit(tmp, step)
    tmp = manager.tmp_dir(3)
    torch.save({"w": torch.full((64,), 3.0)}, tmp / "model.pt")  # the process dies here: no commit
    after_crash = manager.latest()
    value_after_crash = float(safe_load(after_crash / "model.pt")["w"][0])
    newest = after_crash / "model.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # storage damage after the commit: manifest size mismatch
    after_damage = manager.latest()
    value_after_damage = float(safe_load(after_damage / "model.pt")["w"][0])
    kept = f"{manager.root.name}/ holds {_listing(manager.root)}"
    passed = (after_crash.name == "step_00000002" and value_after_crash == 2.0
              and after_damage.name == "step_00000001" and value_after_damage == 1.0)
    return {"latest_after_crash": after_crash.name, "value": value_after_crash,
            "latest_after_truncation": after_damage.name, "passed": passed, "kept": kept,
            "observed": f"latest after the crash: {after_crash.name} (loads, w={value_after_crash}); after truncating "
                        f"its model.pt: {after_damage.name} (loads, w={value_after_damage}): the damaged one is skipped"}


def fault_damaged_latest_checkpoint(ctx: dict, strategy: str, where: str) -> dict:
    """The newest checkpoint's model.pt damaged at equal size after the run; the same run re-run with more steps."""
    from cadiff.testing.faults import job_command, job_env, rerun_after_damaging_latest

    tmp = ctx["tmp"] / f"damaged_{strategy}_{where}"
    run_dir = tmp / "train_ae" / "r"
    if strategy == "single":
        args, env = ["experiment=ae_tiny", "strategy=single", "trainer.num_workers=1", "trainer.log_every=1",
                     "trainer.threads_per_worker=1"], job_env()
    else:
        args, env = [*TRAIN, f"strategy={strategy}"], job_env(ctx["ray_address"])

    def cmd(max_steps: int) -> list[str]:
        return job_command("train_ae", *args, f"trainer.max_steps={max_steps}", "trainer.ckpt_every=2",
                           "trainer.val_every=6", f"data.root={ctx['data_root']}", f"out_root={tmp}", "run_name=r")

    seen = rerun_after_damaging_latest(cmd(4), cmd(6), ctx["tmp"], run_dir, where, env=env, timeout_s=900)
    if seen["damaged"] is None:
        return {**seen, "passed": False, "observed": f"the first run failed (exit {seen['first_exit_code']})",
                "kept": _run_kept(run_dir)}
    export_step = _export_step(run_dir)
    seen["kept"] = _run_kept(run_dir)
    seen["passed"] = (seen["damaged"] == "step_00000004" and seen["exit_code"] == 0 and seen["resumed_from"] == [2]
                      and seen["set_aside"] == [".corrupt_step_00000004"] and export_step == 6)
    why = seen["warnings"][0].split("cannot be resumed: ", 1)[-1][:160] if seen["warnings"] else "no warning logged"
    seen["observed"] = (f"{seen['damage']} of {seen['damaged']}; re-run exit {seen['exit_code']}, WARNING '{why}', "
                        f"resumed after step {seen['resumed_from']}, set aside {seen['set_aside']}, export step "
                        f"{export_step}")
    return seen


def fault_corrupt_shard(ctx: dict, path: str) -> dict:
    """A shard whose clip payload is garbage while its tar headers are intact, found mid-stream."""
    from omegaconf import OmegaConf

    from cadiff.config import DataConfig
    from cadiff.data import pipeline
    from cadiff.testing.faults import corrupt_payload, describe_kept, snapshot

    root = ctx["tmp"] / f"corrupt_{path}"
    shutil.copytree(ctx["data_root"], root)
    bad = root / "train" / "clips-000001.tar"
    corrupt_payload(bad)
    before = snapshot([root])[str(root)]
    out: dict[str, Any] = {}
    for mode in ("fail", "skip"):
        cfg = OmegaConf.structured(DataConfig(batch_size=2, corrupt_shards=mode, flip=False))
        try:
            if path == "ray_data":
                n = len(pipeline.clip_dataset(root, "train", cfg).take_all())
            else:
                batches = pipeline.deterministic_batches(root, "train", cfg, rank=0, world_size=1, seed=0)
                n = sum(next(batches).shape[0] for _ in range(8))
            out[mode] = {"rows": n}
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            text = " ".join(str(exc).split())
            out[mode] = {"error": type(exc).__name__, "names_shard": bad.name in text, "message": text[-300:]}
    if path == "ray_data":
        passed = out["fail"].get("names_shard") is True and out["skip"].get("rows") == 11
        observed = (f"fail: {out['fail'].get('error')} naming {bad.name}: {out['fail'].get('names_shard')}; "
                    f"skip: {out['skip'].get('rows')} of 15 clips (the 4 of the bad shard dropped, warning logged)")
    else:
        passed = all(out[m].get("names_shard") is True for m in ("fail", "skip"))
        observed = (f"fail and skip both raise {out['fail'].get('error')} naming {bad.name} (exact-resume mode cannot "
                    "drop a sample mid-epoch)")
    kept = f"data root: {describe_kept(root, before)}"
    return {**out, "passed": passed and snapshot([root])[str(root)] == before, "observed": observed, "kept": kept}


def _message(exc: BaseException | None) -> str:
    return "no error raised" if exc is None else f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _raises(call: Callable[[], Any], error: type[BaseException]) -> BaseException | None:
    """The ``error`` that ``call()`` raised, or None when it returned."""
    try:
        call()
    except error as exc:
        return exc
    return None


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def fault_download_no_length(ctx: dict) -> dict:
    """The server closes early and sent no Content-Length: the client cannot tell, so nothing is cached."""
    import numpy as np

    from cadiff.data.sources.download import fetch
    from cadiff.errors import DownloadError
    from cadiff.testing.http_server import Handler, serve

    cache = ctx["tmp"] / "dl_no_length"
    with serve() as url:
        Handler.files["/n.bin"] = np.random.default_rng(0).bytes(50_000)
        Handler.faults["/n.bin"] = {"no_length": True, "cut": 20_000}
        exc = _raises(lambda: fetch(f"{url}/n.bin", cache / "n.bin", progress=False), DownloadError)
    left = _listing(cache)
    return {"message": _message(exc), "kept": f"cache folder holds {left or 'nothing'}",
            "passed": exc is not None and "refusing to cache it" in str(exc) and left == []}


def fault_download_resume(ctx: dict) -> dict:
    """The server closes early after sending Content-Length: the ``.part`` stays and the next run resumes it."""
    import hashlib

    import numpy as np

    from cadiff.data.sources.download import LOCK_FILE, fetch
    from cadiff.errors import DownloadError
    from cadiff.testing.http_server import Handler, serve

    dest = ctx["tmp"] / "dl_resume" / "f.bin"
    payload = np.random.default_rng(1).bytes(50_000)
    with serve() as url:
        Handler.files["/f.bin"] = payload
        Handler.faults["/f.bin"] = {"cut": 20_000}
        exc = _raises(lambda: fetch(f"{url}/f.bin", dest, progress=False), DownloadError)
        part = dest.with_name("f.bin.part")
        part_size = part.stat().st_size if part.exists() else None
        Handler.faults.clear()
        fetch(f"{url}/f.bin", dest, progress=False)
        ranges = [rng for _, rng, _ in Handler.log[1:]]
    intact = dest.exists() and hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(payload).digest()
    kept = (f"`{part.name}` kept ({part_size} bytes); next run asked {ranges}, got a file whose sha256 "
            f"{'matches' if intact else 'DIFFERS'}; folder now {_listing(dest.parent)}")
    return {"message": _message(exc), "kept": kept,
            "passed": exc is not None and part_size == 20_000 and ranges == ["bytes=20000-"] and intact
            and _listing(dest.parent) == [LOCK_FILE, "f.bin"]}


def fault_download_tofu_mismatch(ctx: dict) -> dict:
    """A file downloaded again (cache deleted) whose bytes differ from those trusted on first use."""
    import numpy as np

    from cadiff.data.sources.download import LOCK_FILE, fetch
    from cadiff.errors import DownloadError
    from cadiff.testing.faults import describe_kept, snapshot
    from cadiff.testing.http_server import Handler, serve

    dest = ctx["tmp"] / "dl_tofu" / "f.bin"
    with serve() as url:
        Handler.files["/f.bin"] = np.random.default_rng(2).bytes(50_000)
        fetch(f"{url}/f.bin", dest, progress=False)
        dest.unlink()
        lock = dest.with_name(LOCK_FILE)
        before = snapshot([lock])[str(lock)]
        Handler.files["/f.bin"] = np.random.default_rng(3).bytes(50_000)  # same size, other bytes
        exc = _raises(lambda: fetch(f"{url}/f.bin", dest, progress=False), DownloadError)
    kept = f"{describe_kept(lock, before)}; cache folder holds {_listing(dest.parent)}"
    return {"message": _message(exc), "kept": kept,
            "passed": exc is not None and "does not match" in str(exc) and _listing(dest.parent) == [LOCK_FILE]
            and snapshot([lock])[str(lock)] == before}


def fault_zip_bomb(ctx: dict) -> dict:
    """A ~20 KB zip declaring 20 MB of zeros (ratio ~1000, over source.zip_max_ratio)."""
    import zipfile

    from cadiff.data.sources.download import safe_extract_zip
    from cadiff.errors import DataError
    from cadiff.testing.faults import describe_kept

    folder = ctx["tmp"] / "zip_bomb"
    folder.mkdir()
    bomb, out = folder / "bomb.zip", folder / "out"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.tiff", bytes(20_000_000))
    exc = _raises(lambda: safe_extract_zip(bomb, out), DataError)
    return {"message": _message(exc), "kept": f"{describe_kept(out, None)}; folder holds {_listing(folder)}",
            "passed": exc is not None and "zip bomb" in str(exc) and not out.exists()}


def fault_prepare_mid_way(ctx: dict, fault: str) -> dict:
    """prepare_data overwrite=true over earlier data, failing while tiling: ENOSPC or MemoryError."""
    from unittest import mock

    import cadiff.data.prepare as prepare_module
    from cadiff.errors import DataError
    from cadiff.testing.data import prepare_sim
    from cadiff.testing.faults import describe_kept, disk_full_after, fail_on_call, snapshot

    folder = ctx["tmp"] / f"prepare_{fault}"
    out = folder / "data"
    shutil.copytree(ctx["data_root"], out)
    before = snapshot([out])[str(out)]
    if fault == "enospc":
        patch = mock.patch.object(prepare_module, "write_shards", disk_full_after(prepare_module.write_shards, 5))
    else:
        patch = mock.patch.object(prepare_module, "read_frames", fail_on_call(prepare_module.read_frames, 3, MemoryError()))
    with patch:
        exc = _raises(lambda: prepare_sim(out, "clips_per_shard=1", "overwrite=true"), DataError)
    return {"message": _message(exc), "kept": f"{describe_kept(out, before)}; next to it: {_listing(folder)}",
            "passed": exc is not None and snapshot([out])[str(out)] == before and _listing(folder) == ["data"]}


def fault_torn_metrics_tail(ctx: dict) -> dict:
    """metrics.jsonl ends in half a line (a crash mid-append); the resumed run opens it and appends."""
    import logging

    from cadiff.io import read_jsonl
    from cadiff.train.logging import MetricsWriter

    path = ctx["tmp"] / "torn" / "metrics.jsonl"
    path.parent.mkdir()
    complete = b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
    path.write_bytes(complete + b'{"step": 3, "lo')
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("cadiff.train.logging")
    logger.addHandler(handler)
    try:
        MetricsWriter(path).write({"step": 3, "loss": 0.3})
    finally:
        logger.removeHandler(handler)
    data = path.read_bytes()
    steps = [r["step"] for r in read_jsonl(path)]
    lines = complete.count(b"\n")
    kept = (f"its {lines} complete lines {'byte-identical' if data.startswith(complete) else 'CHANGED'}, the torn "
            f"tail cut; steps now {steps}")
    warning = records[0].getMessage() if records else "no warning logged"
    return {"message": f"WARNING {warning}".replace(str(ctx["tmp"]), "<tmp>"), "kept": kept,
            "passed": data.startswith(complete) and steps == [1, 2, 3] and bool(records)}


# ---------------------------------------------------------------------------------------------------------
# bad inputs


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def bad_input_rows(ctx: dict) -> list[dict]:
    from cadiff.testing.bad_inputs import CASES, Env, check_cli, check_message, run_cli, run_in_process
    from cadiff.testing.faults import describe_kept, snapshot

    env = Env(data_root=ctx["data_root"], stage1_run=ctx["stage1_run"])
    rows = []
    for name, build in CASES.items():
        t0 = time.perf_counter()
        case = build(_fresh(ctx["tmp"] / f"in_{name}"), env)
        before = snapshot(case.guard)
        try:
            exc = run_in_process(case)
            raised, message = type(exc).__name__, str(exc)
        except AssertionError as failure:
            raised, message = "nothing", str(failure)
        in_process_clean = snapshot(case.guard) == before
        cli_case = build(_fresh(ctx["tmp"] / f"cli_{name}"), env)
        cli_before = snapshot(cli_case.guard)
        result = run_cli(cli_case, cwd=ctx["tmp"])
        problems = check_cli(cli_case, result) + ([] if snapshot(cli_case.guard) == cli_before else ["partial output"])
        kept = "; ".join(describe_kept(path, cli_before[str(path)]) for path in cli_case.guard)
        missing = check_message(case, message)
        rows.append({
            "case": name, "input": build.__doc__, "job": case.job, "expected_error": case.error.__name__, "raised": raised,
            "message_complete": not missing, "exit_code": result.returncode,
            "line": _last_line(result.stdout).replace(str(ctx["tmp"]), "<tmp>"),
            "cli_problems": problems, "no_partial_output": in_process_clean and "partial output" not in problems,
            "kept": kept if in_process_clean else f"in-process run left output; CLI run: {kept}",
            "seconds": round(time.perf_counter() - t0, 1),
            "passed": raised == case.error.__name__ and not missing and in_process_clean and not problems,
        })
        print(f"  {name}: {'ok' if rows[-1]['passed'] else 'FAILED'} {rows[-1]['line'][:100]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# report


FAULTS: list[tuple[str, str, bool, Callable[[dict], dict]]] = [
    ("worker SIGKILL mid-run", "DDP, 2 workers, 12 steps, ckpt every 3, max_failures=1", True,
     lambda c: fault_worker_kill(c, "ddp", 1)),
    ("worker SIGKILL mid-run", "DeepSpeed ZeRO-2, 2 workers, 12 steps, ckpt every 3, max_failures=1", True,
     lambda c: fault_worker_kill(c, "deepspeed_zero2", 1)),
    ("worker SIGKILL, no retries", "DDP, max_failures=0, then the same command again", True,
     lambda c: fault_worker_kill(c, "ddp", 0)),
    ("driver SIGTERM", "DDP job on the cluster, 6 steps, ckpt every 2; same command again", True,
     lambda c: fault_driver_signal(c, signal.SIGTERM)),
    ("driver SIGINT + half-written checkpoint", "strategy=single, 16 steps, ckpt every 4; same command again", False,
     lambda c: fault_driver_signal(c, signal.SIGINT)),
    ("two runs of one run_name at once", "strategy=single, 24 steps; the same command again once the first "
     "has logged a step", False, fault_same_run_twice),
    ("crash inside a checkpoint write", "CheckpointManager, num_to_keep=2; then truncate the newest committed file", False,
     fault_checkpoint_write_crash),
    ("damaged latest checkpoint, same size", "strategy=single, 4 steps, ckpt every 2; 4 KiB zeroed inside model.pt's "
     "tensor data of step 4; same run to 6 steps", False, lambda c: fault_damaged_latest_checkpoint(c, "single", "tensor_data")),
    ("damaged latest checkpoint, same size", "strategy=single, as above; model.pt's first 4 KiB (zip header) zeroed", False,
     lambda c: fault_damaged_latest_checkpoint(c, "single", "header")),
    ("damaged latest registered checkpoint", "DDP, 2 workers, as above: 4 KiB zeroed inside model.pt's tensor data", True,
     lambda c: fault_damaged_latest_checkpoint(c, "ddp", "tensor_data")),
    ("corrupt shard mid-stream (Ray Data)", "clip payload overwritten, tar headers intact; fail / skip", True,
     lambda c: fault_corrupt_shard(c, "ray_data")),
    ("corrupt shard mid-stream (deterministic)", "same shard, data.deterministic path; fail / skip", False,
     lambda c: fault_corrupt_shard(c, "deterministic")),
    ("download closed early, no Content-Length", "loopback server sends 20000 of 50000 bytes, no length", False,
     fault_download_no_length),
    ("download closed early, with Content-Length", "loopback server sends 20000 of 50000 bytes; the same fetch "
     "again", False, fault_download_resume),
    ("downloaded file differs from the one trusted on first use", "fetched once, cache file deleted, server file "
     "changed (same size)", False, fault_download_tofu_mismatch),
    ("zip bomb", "safe_extract_zip of a ~20 KB zip declaring 20 MB", False, fault_zip_bomb),
    ("disk full while preparing data", "prepare_data overwrite=true over complete data; ENOSPC after 5 clips", False,
     lambda c: fault_prepare_mid_way(c, "enospc")),
    ("out of memory while preparing data", "prepare_data overwrite=true over complete data; MemoryError reading "
     "the 3rd recording", False, lambda c: fault_prepare_mid_way(c, "memory")),
    ("torn metrics.jsonl tail", "2 complete lines + half a line; MetricsWriter opened and one record appended", False,
     fault_torn_metrics_tail),
]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


HEADER = ["| input or fault | setup | observed one-line message | what was kept | outcome | time (s) |",
          "|---|---|---|---|---|---:|"]


def _outcome(row: dict) -> str:
    return "PASS" if row.get("passed") else ("SKIPPED" if row.get("skipped") else "FAIL")


def _matrix_row(what: str, setup: str, message: str, kept: str, row: dict) -> str:
    return (f"| {_cell(what)} | {_cell(setup)} | {_cell(message)} | {_cell(kept)} | {_outcome(row)} "
            f"| {row.get('seconds', '')} |")


def to_markdown(result: dict) -> str:
    out = ["# Reliability report", "",
           f"Generated by `benchmarks/reliability.py` on host `{result['host']}` ({result['cpus']} CPUs), "
           f"{result['date']}, ray {result['ray']}, torch {result['torch']}. Every outcome below was observed in this "
           "run; \"what was kept\" is what the script found afterwards (files hashed before and after, folders listed).",
           "", "## Faults injected", "", *HEADER]
    for row in result["faults"]:
        message = row.get("message") or row.get("observed") or row.get("error", "")
        out.append(_matrix_row(row["fault"], row["setup"], message, row.get("kept", ""), row))
    out += ["", "## Bad inputs", "",
            "Each case runs in-process (exception class, message naming the path/key and the expected form) and "
            "through its job CLI (exit code 2, exactly one `cadiff <job>: error:` line, no traceback); \"what was "
            "kept\" compares the guarded output/run folders before and after the CLI run.", "", *HEADER]
    for row in result["bad_inputs"]:
        setup = f"{row['job']} ({row['case']}): {row['raised']}, exit {row['exit_code']}"
        message = row["line"].split(": error: ", 1)[-1][:240]
        out.append(_matrix_row(row["input"], setup, message, row["kept"], row))
    passed = sum(r.get("passed", False) for r in result["faults"] + result["bad_inputs"])
    total = sum(not r.get("skipped") for r in result["faults"] + result["bad_inputs"])
    out += ["", f"{passed} of {total} checks passed.", ""]
    return "\n".join(out)


def _setup(tmp: Path) -> dict:
    from cadiff.config import compose
    from cadiff.testing.data import prepare_sim
    from cadiff.train.launch import run_training

    data_root = tmp / "sim"
    prepare_sim(data_root)
    cfg = compose("train_ae", ["experiment=ae_tiny", f"data.root={data_root}", f"out_root={tmp / 'stage1'}",
                               "run_name=s1", "strategy=single", "trainer.num_workers=1", "trainer.max_steps=3",
                               "trainer.log_every=1", "trainer.val_every=3", "trainer.ckpt_every=3"])
    _, stage1 = run_training(cfg, "ae")
    return {"tmp": tmp, "data_root": data_root, "stage1_run": Path(stage1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-ray", action="store_true", help="skip the faults that need a Ray cluster")
    parser.add_argument("--only", choices=("faults", "inputs"), help="run one half of the report")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("WANDB_MODE", "offline")

    import ray
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="cadiff-reliability-"))
    try:
        ctx = _setup(tmp)
        faults: list[dict] = []
        if args.only != "inputs":
            if not args.skip_ray:
                ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
                ctx["ray_address"] = ray.get_runtime_context().gcs_address
            for fault, setup, needs_ray, run in FAULTS:
                row: dict[str, Any] = {"fault": fault, "setup": setup}
                if needs_ray and args.skip_ray:
                    row["skipped"] = True
                else:
                    print(f"fault: {fault} ({setup})", flush=True)
                    t0 = time.perf_counter()
                    try:
                        row.update(run(ctx))
                    except Exception as exc:  # noqa: BLE001 - a crashed scenario is a FAIL row, not a crashed report
                        row.update(passed=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:],
                                   kept="not observed: the scenario itself crashed")
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    for key in ("observed", "message", "kept"):
                        row[key] = str(row.get(key, "")).replace(str(tmp), "<tmp>")
                    said = row["message"] or row["observed"] or row.get("error")
                    print(f"  -> {_outcome(row)}: {said} | kept: {row['kept']}", flush=True)
                faults.append(row)
            if ray.is_initialized():
                ray.shutdown()
        bad_inputs = bad_input_rows(ctx) if args.only != "faults" else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"host": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
              "faults": faults, "bad_inputs": bad_inputs}
    write_results(args.out, "reliability", result, to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
