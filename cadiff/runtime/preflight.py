"""Pre-flight of a job that joins an existing Ray cluster (``ray.address`` / ``$RAY_ADDRESS``).

A job sent with ``ray job submit --working-dir .`` runs in Ray's per-job working directory on each node, so a
relative path names a different temporary folder on every node: on a cluster the paths a job reads and writes
must be absolute (:func:`check_cluster_paths`, before anything is written). Then one Ray task pinned to each
alive node (:func:`probe_cluster_paths`) proves that node can read every input path and write every output path
(a probe file created and deleted), and that the output path is the driver's storage: it must read a marker file
the driver wrote there. Both run before any training step; every failure names the node, the key and the path.
A job that starts its own local Ray (no address) skips both: its one node is the driver's machine. URIs
(``s3://``, ``gs://``) are left to the storage layer.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cadiff import storage
from cadiff.errors import CadiffError, ConfigError
from cadiff.io import write_text_atomic

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0  # a node's probe task: scheduling a 0-CPU task plus a few file operations on shared storage
MARKER_PREFIX = ".cadiff-preflight-"


@dataclass(frozen=True)
class SharedPath:
    """A config key's path that every node must see: ``write`` ones are written to, the others read."""

    key: str
    path: str
    write: bool = False


def cluster_address(ray_cfg: Any) -> str | None:
    """The existing cluster a job joins (``ray.address``, else ``$RAY_ADDRESS``); None when it starts its own."""
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


def shared_paths(cfg: Any, reads: Sequence[str] = (), writes: Sequence[str] = ()) -> list[SharedPath]:
    """The set (non-null) path keys of a job config, reads before writes."""
    from omegaconf import OmegaConf

    found = []
    for keys, write in ((reads, False), (writes, True)):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value is not None:
                found.append(SharedPath(key, str(value), write))
    return found


def check_cluster_paths(ray_cfg: Any, paths: Sequence[SharedPath]) -> None:
    """On an existing cluster, refuse a relative path: it would resolve in each node's own job working dir."""
    address = cluster_address(ray_cfg)
    if address is None:
        return
    for p in paths:
        if not os.path.isabs(p.path) and not storage.is_uri(p.path):
            raise ConfigError(
                f"config key '{p.key}' = {p.path!r}: expected an absolute path on storage every node mounts, since the "
                f"job joins the Ray cluster at {address} (a submitted job runs in Ray's per-job working directory on "
                "each node, so a relative path is a different temporary folder on every node)"
            )


def probe_cluster_paths(ray_cfg: Any, paths: Sequence[SharedPath], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """On an existing cluster, one task per alive node reads/writes every path; CadiffError lists what failed."""
    paths = [p for p in paths if not storage.is_uri(p.path)]  # buckets: checked by the storage layer, not with file APIs
    if cluster_address(ray_cfg) is None or not paths:
        return
    check_cluster_paths(ray_cfg, paths)
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    with driver_witnesses(paths) as witnesses:
        problems = _run_probes(nodes, paths, witnesses, timeout_s)
    if problems:
        raise CadiffError(f"pre-flight on {len(nodes)} Ray node(s) failed: " + "; ".join(problems))
    log.info("pre-flight: %d Ray node(s) read %s and write %s", len(nodes),
             [p.key for p in paths if not p.write], [p.key for p in paths if p.write])


@contextmanager
def driver_witnesses(paths: Sequence[SharedPath]) -> Iterator[dict[str, tuple[str, str | None]]]:
    """path -> (file name, content) each node must find there: for outputs a marker the driver writes (and
    removes on exit, whatever happens), for inputs their ``index.json`` when the driver sees one."""
    witnesses: dict[str, tuple[str, str | None]] = {}
    try:
        for p in paths:
            if p.write:
                token = uuid.uuid4().hex
                try:
                    os.makedirs(p.path, exist_ok=True)
                    write_text_atomic(os.path.join(p.path, MARKER_PREFIX + token), token)
                except OSError as exc:
                    raise CadiffError(f"pre-flight: this driver cannot write {p.key}={p.path}: "
                                      f"{exc.strerror or type(exc).__name__}") from None
                witnesses[p.path] = (MARKER_PREFIX + token, token)
            elif os.path.isfile(os.path.join(p.path, "index.json")):
                witnesses[p.path] = ("index.json", None)
        yield witnesses
    finally:
        for p in paths:
            name, content = witnesses.get(p.path, ("", None))
            if p.write and content is not None:
                _remove(os.path.join(p.path, name))


def _run_probes(nodes: list[dict], paths: Sequence[SharedPath], witnesses: dict, timeout_s: float) -> list[str]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # 0 CPUs: the probe must run on a CPU-0 head and beside a busy worker; no retry on another node (soft=False)
    task = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    refs = {
        _node_label(n["NodeID"], n["NodeManagerAddress"]): task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(list(paths), witnesses)
        for n in nodes
    }
    _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    problems = []
    for label, ref in refs.items():
        if ref in pending:
            ray.cancel(ref, force=True)
            problems.append(f"node {label}: its probe task did not finish within {timeout_s:g} s")
            continue
        try:
            problems += ray.get(ref)
        except ray.exceptions.RayError as exc:
            problems.append(f"node {label}: its probe task failed: {str(exc).strip().splitlines()[-1]}")
    return problems


def _node_label(node_id: str, ip: str) -> str:
    return f"{node_id[:12]} ({ip})"


def probe_node(paths: Sequence[SharedPath], witnesses: dict[str, tuple[str, str | None]]) -> list[str]:
    """The Ray task on each node: :func:`node_problems` under this node's id and address."""
    import ray

    label = _node_label(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    return node_problems(label, paths, witnesses)


def node_problems(label: str, paths: Sequence[SharedPath], witnesses: dict[str, tuple[str, str | None]]) -> list[str]:
    """A problem line per path this machine cannot read or write, or whose witness file is missing ([] when fine)."""
    problems = []
    for p in paths:
        problem = _probe_write(p.path) if p.write else _probe_read(p.path)
        problem = problem or _check_witness(p.path, witnesses.get(p.path))
        if problem:
            problems.append(f"node {label} cannot {'write' if p.write else 'read'} {p.key}={p.path}: {problem}")
    return problems


def _probe_read(path: str) -> str | None:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _probe_write(path: str) -> str | None:
    probe = os.path.join(path, f"{MARKER_PREFIX}{uuid.uuid4().hex}.probe")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "x") as f:
            f.write("probe")
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    finally:
        _remove(probe)
    return None


def _check_witness(path: str, witness: tuple[str, str | None] | None) -> str | None:
    """The driver's file must be there with its content: otherwise this node has other storage at that path."""
    if witness is None:
        return None
    name, content = witness
    try:
        with open(os.path.join(path, name)) as f:
            seen = f.read()
    except OSError as exc:
        return (f"{name}, which the driver sees there, is not readable here ({exc.strerror or type(exc).__name__}): "
                "not the driver's storage; mount the same shared filesystem on every node")
    if content is not None and seen != content:
        return f"{name} differs from the driver's copy: not the driver's storage"
    return None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("pre-flight: could not remove %s: %s", path, exc.strerror or type(exc).__name__)
