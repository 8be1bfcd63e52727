"""Autoscaling on one machine: cluster/aws.yaml's node types on Ray's fake multi-node provider.

A private head (tests/local_head.py) runs the autoscaler with ``RAY_FAKE_CLUSTER=1`` on a config derived from
aws.yaml - same node types, head with 0 CPUs, workers scaled down to 1 CPU, ``min_workers: 0``, a 6 s idle
timeout - and a Ray Tune run whose trials need 1 CPU each is driven against it from a separate process (as
``ray job submit`` would). The autoscaler must start worker nodes for the pending trials, the trials must run on
them (the node ids they report are fake-provider worker ids), their files and Tune checkpoints must land under
the run's storage, and the workers must be released after the idle timeout.

``ray.cluster_utils.AutoscalingCluster`` is not used: its ``start()`` runs ``ray stop --force``, which would kill
every Ray session on the host (the suite's shared cluster included), and its base config file is not in the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


# The driver, as a job on the cluster would run: two 1-CPU trials on a head with 0 CPUs, then wait for the release.
DRIVER = r"""
import json, os, sys, tempfile, time
import ray
from ray import tune

out_root, storage, release_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + 120
while True:
    try:
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
        break
    except ConnectionError:
        if time.monotonic() > deadline:
            raise
        time.sleep(2)
head = ray.get_runtime_context().get_node_id()
alive = lambda: sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
before = alive()


def trial(config):
    node = ray.get_runtime_context().get_node_id()
    with open(os.path.join(config["out_root"], f"trial_{config['i']}.json"), "w") as f:
        json.dump({"node": node}, f)
    time.sleep(2)  # both trials hold their node at once
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "node.txt"), "w") as f:
            f.write(node)
        tune.report({"node": node}, checkpoint=tune.Checkpoint.from_directory(d))


tuner = tune.Tuner(
    tune.with_resources(trial, {"CPU": 1}),
    param_space={"i": tune.grid_search([0, 1]), "out_root": out_root},
    tune_config=tune.TuneConfig(max_concurrent_trials=2),
    run_config=tune.RunConfig(name="fake_autoscaling", storage_path=storage, verbose=0),
)
results = tuner.fit()
launched = sorted(n["NodeID"] for n in ray.nodes() if n["NodeID"] != head)
start = time.monotonic()
while alive() != [head] and time.monotonic() - start < release_s:
    time.sleep(1)
print("RESULT " + json.dumps({
    "head": head, "before": before, "launched": launched, "after": alive(),
    "release_s": time.monotonic() - start, "errors": [str(r.error) for r in results if r.error],
    "trial_nodes": [r.metrics["node"] for r in results],
    "checkpoints": [os.path.join(r.checkpoint.path, "node.txt") for r in results if r.checkpoint],
}))
"""


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


def test_sweep_scales_workers_up_from_zero_and_back_down(tmp_path):
    temp_dir = short_temp_dir("cadiff-as-")
    cmd, ports = head_command(temp_dir, 0, False, f"--object-store-memory={OBJECT_STORE_BYTES}")
    gcs_address = f"127.0.0.1:{ports['gcs']}"
    config = tmp_path / "fake_autoscaling.yaml"
    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config.write_text(json.dumps(fake_cluster_config(launcher, gcs_address)))
    cmd.append(f"--autoscaling-config={config}")
    # loopback only: no token (a token left in ~/.ray by other sessions must not be demanded of this driver)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
    out_root, storage = tmp_path / "out", tmp_path / "tune"
    out_root.mkdir()
    with head_process(cmd, env, tmp_path / "head.log", temp_dir):
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(out_root), str(storage), "90"],
            env={**env, "RAY_ADDRESS": gcs_address}, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_S,
        )
    logs = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, logs[-4000:] + (tmp_path / "head.log").read_text()[-2000:]
    run = json.loads(lines[-1][len("RESULT "):])

    assert run["before"] == [run["head"]] and not run["errors"], run  # started from zero workers; every trial ran
    workers = set(run["launched"])
    assert workers and all(w.startswith(FAKE_WORKER_ID_PREFIX) and w != run["head"] for w in workers), run
    assert len(run["trial_nodes"]) == 2 and set(run["trial_nodes"]) <= workers, run  # trials on autoscaled nodes
    written = {json.loads((out_root / f"trial_{i}.json").read_text())["node"] for i in (0, 1)}
    assert written == set(run["trial_nodes"])
    assert len(run["checkpoints"]) == 2
    for path in run["checkpoints"]:
        assert Path(path).is_relative_to(storage / "fake_autoscaling") and Path(path).read_text() in workers
    assert run["after"] == [run["head"]], run  # idle workers released
