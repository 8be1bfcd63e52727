"""Autoscaling on one machine: cluster/aws.yaml's node types on Ray's fake multi-node provider.

A private head (tests/local_head.py) runs the autoscaler with ``RAY_FAKE_CLUSTER=1`` on a config derived from
aws.yaml - same node types, head with 0 CPUs, workers scaled down to 1 CPU, ``min_workers: 0``, a 6 s idle
timeout - and a cadiff sweep (``jobs/sweep.py``: Tune trials, each a Train V2 run with Ray Data ingest) is
driven against it from a separate process (as ``ray job submit`` would). The autoscaler must start worker nodes
for the pending trials, the trials must run on them (the node of each trial's Train worker, read from its
run.json, is a fake-provider worker id), their run folders and exports must be written, and the workers must be
released after the idle timeout. (A plain Ray Tune run of two 1-CPU trials was checked the same way until the
cadiff sweep test, which holds it to every one of those checks, replaced it.)

``ray.cluster_utils.AutoscalingCluster`` is not used: its ``start()`` runs ``ray stop --force``, which would kill
every Ray session on the host (the suite's shared cluster included), and its base config file is not in the wheel.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.local_head import head_command, head_process, short_temp_dir

pytestmark = pytest.mark.ray  # ~31 s measured: under the 60 s "slow" line

REPO = Path(__file__).resolve().parents[2]
WORKER_CPUS = 1  # every worker type scaled to one CPU: two fake nodes fit a 2-core box
MAX_WORKERS = 2  # per type and in all
IDLE_TIMEOUT_MIN = 0.1  # 6 s
OBJECT_STORE_BYTES = 100 * 1024**2  # per node; Ray's default (30% of RAM per fake node) would overfill /dev/shm
FAKE_WORKER_ID_PREFIX = "f" * 51  # the fake provider's node ids: this + 00000 (head), 00001, 00002, ...
RUN_S = 420


def fake_cluster_config(launcher: dict, gcs_address: str) -> dict:
    """A launcher config's node types on Ray's fake multi-node provider, resources scaled down to this machine."""
    head_type = launcher["head_node_type"]
    head_cpus = launcher["available_node_types"][head_type]["resources"].get("CPU", 0)
    types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, node_type in launcher["available_node_types"].items():
        if name == head_type:
            continue
        resources = {"CPU": WORKER_CPUS, "object_store_memory": OBJECT_STORE_BYTES}
        if node_type["resources"].get("GPU"):
            resources["GPU"] = 1  # logical only: nothing here asks for one
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0,
                       "max_workers": min(node_type["max_workers"], MAX_WORKERS)}
    empty_lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                   "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
                   "rsync_exclude", "rsync_filter")
    return {
        "cluster_name": f"fake-{launcher['cluster_name']}",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": launcher["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        # fake nodes share one IP: the autoscaler must tell them apart (and see their load) by node id; no SSH
        # updaters or launch-config checks for nodes that are local processes
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists},
    }



def test_fake_cluster_config_derives_from_aws_yaml():
    from ray.autoscaler._private.util import validate_config

    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    cfg = fake_cluster_config(launcher, "127.0.0.1:1")
    validate_config(cfg)  # what the autoscaler checks when it loads the file
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != "ray.head.default"}
    assert set(workers) == set(launcher["available_node_types"]) - {launcher["head_node_type"]}
    assert cfg["available_node_types"]["ray.head.default"]["resources"] == {"CPU": 0}
    assert all(v["resources"]["CPU"] == WORKER_CPUS and v["min_workers"] == 0 for v in workers.values())
    assert workers["worker.gpu_train"]["resources"]["GPU"] == 1 and "GPU" not in workers["worker.cpu_data"]["resources"]


@dataclass(frozen=True)
class FakeCluster:
    """A running fake autoscaling head: its GCS address, the environment its drivers run with, its log."""

    gcs_address: str
    env: dict[str, str]
    log: Path
    dashboard_port: int

    def driver_env(self) -> dict[str, str]:
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def logs(self) -> str:
        return self.log.read_text()[-2000:]

    def nodes(self) -> dict[str, bool]:
        """Every node the GCS has seen, node id -> alive; read with a GCS client, without joining as a driver."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = GcsClient(address=self.gcs_address).get_all_node_info(timeout=10).values()
        return {info.node_id.hex(): info.state == GcsNodeInfo.ALIVE for info in infos}

    def actors_on(self, nodes: set[str]) -> list[str]:
        """The alive actors on ``nodes`` (class, name, node): what keeps a worker from being released."""
        from ray.util.state import list_actors

        actors = list_actors(address=f"http://127.0.0.1:{self.dashboard_port}", filters=[("state", "=", "ALIVE")],
                             limit=100, raise_on_missing_output=False)
        return [f"{a.class_name} {a.name or ''} on {a.node_id[-5:]}" for a in actors if a.node_id in nodes]

    def alive(self) -> set[str]:
        return {node for node, alive in self.nodes().items() if alive}

    def wait_alive(self, done: Callable[[set[str]], bool], timeout_s: float) -> set[str]:
        """The alive nodes once ``done(alive)`` holds, or when ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                alive = self.alive()
            except Exception:  # the GCS is still starting
                alive = set()
            if done(alive) or time.monotonic() > deadline:
                return alive
            time.sleep(1)


@contextlib.contextmanager
def fake_autoscaling_head(tmp_path: Path, dashboard: bool = False) -> Iterator[FakeCluster]:
    """A private head (0 CPUs) whose autoscaler runs aws.yaml's node types on the fake multi-node provider."""
    temp_dir = short_temp_dir("cadiff-as-")
    cmd, ports = head_command(temp_dir, 0, dashboard, f"--object-store-memory={OBJECT_STORE_BYTES}")
    gcs_address = f"127.0.0.1:{ports['gcs']}"
    config = tmp_path / "fake_autoscaling.yaml"
    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config.write_text(json.dumps(fake_cluster_config(launcher, gcs_address)))
    cmd.append(f"--autoscaling-config={config}")
    # loopback only: no token (a token left in ~/.ray by other sessions must not be demanded of this driver)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
    with head_process(cmd, env, tmp_path / "head.log", temp_dir):
        yield FakeCluster(gcs_address, env, tmp_path / "head.log", ports["dashboard"])


SWEEP_RUN_S = 150
RELEASE_S = 60


def run_logged(cmd: list[str], cluster: FakeCluster, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run a driver against ``cluster``; past ``timeout_s`` fail with what it and the head logged so far."""
    try:
        return subprocess.run(cmd, env=cluster.driver_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        said = [(part or b"").decode(errors="replace")[-3000:] for part in (exc.stdout, exc.stderr)]
        pytest.fail(f"{cmd[1]} still running after {timeout_s} s:\n{said[0]}\n{said[1]}\n{cluster.logs()}")


@pytest.mark.slow
def test_cadiff_sweep_scales_workers_up_from_zero_and_back_down(tmp_path, sim_data_root):
    """``jobs/sweep.py`` submitted to the fake autoscaling cluster as a job would run on it.

    Two trials of a noise-schedule sweep (ae_tiny, 2 steps, one Train worker each) on a head with 0 CPUs: the
    autoscaler must launch the worker nodes the trials ask for, every trial must finish there (each run.json
    records the node its Train worker ran on), the sweep must write its results, and the idle workers must go.

    What a trial asks for: its Tune function (0.01 CPU), the Train controller (0 CPU, beside the function), one
    Train worker (``cpus_per_worker=0.5``) and Ray Data decode tasks (``data.cpus_per_task``, Ray's default 1 CPU).
    With 1-CPU nodes and two trials at once, each trial's function and worker fill half of a node and no node
    has the 1 CPU a decode task needs, with the cluster at ``max_workers``: both trials wait for data forever
    (seen: ``MapBatches(_ShardToBatch): Tasks: 1 [backpressured]`` until the timeout). A real cluster whose
    nodes are smaller than a whole trial has the same deadlock. ``data.cpus_per_task=0.25`` makes a whole trial
    0.76 CPU, so each fits one node.
    """
    out_root = tmp_path / "sweeps"
    args = ["space=noise_schedule", "stage=ae", "num_samples=2", "scheduler=none", "name=as", "workers_per_trial=1",
            "max_concurrent_trials=2", "report_every=2", "trainer.max_steps=2", "data.cpus_per_task=0.25",
            f"data.root={sim_data_root}", f"out_root={out_root}"]  # absolute: the pre-flight refuses relative paths
    with fake_autoscaling_head(tmp_path, dashboard=True) as cluster:
        before = cluster.wait_alive(lambda alive: len(alive) == 1, timeout_s=60)
        started = time.monotonic()
        proc = run_logged([sys.executable, str(REPO / "jobs" / "sweep.py"), *args], cluster, tmp_path, SWEEP_RUN_S)
        sweep_s = time.monotonic() - started
        after = cluster.wait_alive(lambda alive: alive == before, timeout_s=RELEASE_S)
        released_s = time.monotonic() - started - sweep_s
        holding = cluster.actors_on(after - before) if after != before else []
        launched = set(cluster.nodes()) - before
        head_log = cluster.logs()
    final = [line for line in proc.stdout.splitlines() if line.startswith("cadiff sweep:")]
    assert proc.returncode == 0 and final, proc.stdout[-3000:] + proc.stderr[-3000:] + head_log
    sweep_dir = out_root / "sweep" / "as"
    assert final[-1].startswith("cadiff sweep: ok 2 trials (0 stopped early)") and final[-1].endswith(f"-> {sweep_dir}")

    assert len(before) == 1, before  # the head alone: no worker before the sweep asked for one
    assert launched and all(node.startswith(FAKE_WORKER_ID_PREFIX) for node in launched), launched
    with open(sweep_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["status"], r["steps"]) for r in rows] == [("ok", "2")] * 2, rows  # every trial finished
    assert (sweep_dir / "results.md").is_file() and (sweep_dir / "report.html").is_file()
    trial_nodes = set()
    for row in rows:
        run_dir = sweep_dir / "trials" / "train_ae" / f"trial_{row['trial_id']}"
        workers = json.loads((run_dir / "run.json").read_text())["workers"]
        assert [w["rank"] for w in workers] == [0] and (run_dir / "export" / "model.pt").is_file()
        trial_nodes.add(workers[0]["node_id"])
    assert trial_nodes <= launched, (trial_nodes, launched)  # every Train worker ran on an autoscaled node
    assert after == before, f"workers still up {released_s:.0f} s after the sweep: {after - before}, actors {holding}"
    print(f"sweep {sweep_s:.0f} s, workers released {released_s:.0f} s after it; nodes launched: {len(launched)}")
