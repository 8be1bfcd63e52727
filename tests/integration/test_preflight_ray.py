"""The per-node pre-flight as Ray tasks on the shared local cluster, joined through its address as a job on a
real cluster would be: every alive node (here the one) reads data.root and writes out_root, or the job stops
with the node's id and the path."""

from __future__ import annotations

import pytest

from cadiff.config import RayConfig
from cadiff.errors import CadiffError
from cadiff.runtime import preflight
from cadiff.runtime.preflight import SharedPath, probe_cluster_paths

pytestmark = pytest.mark.ray


def _joined(ray) -> RayConfig:
    return RayConfig(address=ray.get_runtime_context().gcs_address)


def _ip(ray) -> str:
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])


def test_probe_passes_on_shared_paths_and_leaves_nothing(ray_cluster, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "index.json").write_text("{}")
    paths = [SharedPath("data.root", str(data)), SharedPath("out_root", str(out), write=True)]
    probe_cluster_paths(_joined(ray_cluster), paths)
    assert list(out.iterdir()) == []  # the driver's marker and the node's probe file are gone


def test_probe_names_the_node_and_path_it_fails_on(ray_cluster, tmp_path):
    missing = tmp_path / "no_data"
    node = ray_cluster.get_runtime_context().get_node_id()[:12]
    with pytest.raises(CadiffError) as err:
        probe_cluster_paths(_joined(ray_cluster), [SharedPath("data.root", str(missing))])
    assert str(err.value) == (f"pre-flight on 1 Ray node(s) failed: node {node} ({_ip(ray_cluster)}) cannot read "
                              f"data.root={missing}: No such file or directory")
    # a node whose path is other storage than the driver's does not see the driver's marker
    nodes = [n for n in ray_cluster.nodes() if n["Alive"]]
    out = tmp_path / "out"
    out.mkdir()
    problems = preflight._run_probes(nodes, [SharedPath("out_root", str(out), write=True)],
                                     {str(out): (".cadiff-preflight-elsewhere", "t")}, 60)
    assert len(problems) == 1 and f"node {node} (" in problems[0] and "not the driver's storage" in problems[0]
