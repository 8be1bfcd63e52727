"""cadiff.runtime.preflight without Ray: which paths a cluster job must give as absolute, what each node's probe
reports, and that the driver's marker files never outlive the pre-flight."""

from __future__ import annotations

import pytest

from cadiff import storage
from cadiff.config import RayConfig, compose
from cadiff.errors import CadiffError, ConfigError
from cadiff.runtime import preflight
from cadiff.runtime.preflight import (
    SharedPath,
    check_cluster_paths,
    cluster_address,
    driver_witnesses,
    node_problems,
    shared_paths,
)
from cadiff.train import launch

ADDRESS = "10.0.0.1:6379"


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_cluster_address_from_config_or_environment(monkeypatch):
    assert cluster_address(RayConfig()) is None
    assert cluster_address(RayConfig(address="local")) is None
    assert cluster_address(RayConfig(address=ADDRESS)) == ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert cluster_address(RayConfig()) == "auto"


def test_shared_paths_reads_then_writes_and_skips_unset_keys():
    cfg = compose("encode_latents", ["data.root=/d", "out=/o"])
    assert shared_paths(cfg, reads=["data.root"], writes=["out"]) == [
        SharedPath("data.root", "/d"), SharedPath("out", "/o", write=True)]
    sample = compose("sample", ["out=/o"], validate=False)
    assert shared_paths(sample, reads=["stage2"]) == []  # stage2 unset (null)


@pytest.mark.parametrize("key,value", [("out_root", "outputs"), ("data.root", "./data/sim"), ("data.root", "~/d")])
def test_relative_paths_refused_on_a_cluster(key, value):
    paths = [SharedPath("data.root", "/shared/data"), SharedPath("out_root", "/shared/out", write=True)]
    paths = [SharedPath(p.key, value, p.write) if p.key == key else p for p in paths]
    with pytest.raises(ConfigError) as err:
        check_cluster_paths(RayConfig(address=ADDRESS), paths)
    message = str(err.value)
    assert f"config key '{key}' = {value!r}" in message and "expected an absolute path" in message
    assert ADDRESS in message and "working directory on each node" in message and "\n" not in message
    check_cluster_paths(RayConfig(), paths)  # a local Ray: relative paths are the driver's, as always


def test_train_job_refuses_a_relative_out_root_before_ray_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", ADDRESS)
    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: pytest.fail("Ray started before the path check"))
    cfg = compose("train_ae", ["experiment=ae_tiny", f"data.root={tmp_path}", "out_root=outputs", "strategy=ddp"])
    with pytest.raises(ConfigError, match="config key 'out_root' = 'outputs'"):
        launch.run_training(cfg, "ae")
    assert not (tmp_path / "outputs").exists()


def test_node_problems_none_for_readable_and_writable_paths(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out" / "new"
    data.mkdir()
    (data / "index.json").write_text("{}")
    paths = [SharedPath("data.root", str(data)), SharedPath("out_root", str(out), write=True)]
    assert node_problems("n1", paths, {str(data): ("index.json", None)}) == []
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file was written and removed


def test_node_problems_name_node_key_path_and_reason(tmp_path):
    missing = tmp_path / "missing"
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    paths = [SharedPath("data.root", str(missing)), SharedPath("out_root", str(blocked), write=True)]
    problems = node_problems("abc (10.0.0.2)", paths, {})
    assert problems == [
        f"node abc (10.0.0.2) cannot read data.root={missing}: No such file or directory",
        f"node abc (10.0.0.2) cannot write out_root={blocked}: File exists",
    ]


def test_node_problems_when_the_path_is_not_the_drivers_storage(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cadiff-preflight-x").write_text("another token")
    write = [SharedPath("out_root", str(out), write=True)]
    assert "differs from the driver's copy" in node_problems("n", write, {str(out): (".cadiff-preflight-x", "t")})[0]
    problem = node_problems("n", write, {str(out): (".cadiff-preflight-y", "t")})[0]
    assert problem.startswith(f"node n cannot write out_root={out}: .cadiff-preflight-y, which the driver sees there")
    assert "mount the same shared filesystem on every node" in problem


def test_driver_witnesses_written_then_removed_even_on_error(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "index.json").write_text("{}")
    paths = [SharedPath("data.root", str(data)), SharedPath("out_root", str(out), write=True)]
    with pytest.raises(KeyboardInterrupt):
        with driver_witnesses(paths) as witnesses:
            name, token = witnesses[str(out)]
            assert (out / name).read_text() == token and name.startswith(preflight.MARKER_PREFIX)
            assert witnesses[str(data)] == ("index.json", None)
            raise KeyboardInterrupt
    assert list(out.iterdir()) == []


def test_probe_is_skipped_without_a_cluster(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "_run_probes", lambda *a: pytest.fail("probed a local Ray"))
    preflight.probe_cluster_paths(RayConfig(), [SharedPath("out_root", "relative", write=True)])


def test_driver_that_cannot_write_out_root_fails_in_one_line(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(CadiffError, match=f"^pre-flight: this driver cannot write out_root={blocked}: File exists$"):
        with driver_witnesses([SharedPath("out_root", str(blocked), write=True)]):
            pytest.fail("no witnesses without a writable out_root")


def test_uris_are_not_relative_paths_and_not_probed(monkeypatch):
    monkeypatch.setattr(preflight, "_run_probes", lambda *a: pytest.fail("probed a bucket with file APIs"))
    buckets = [SharedPath("data.root", "s3://b/data"), SharedPath("out_root", "gs://b/out", write=True)]
    check_cluster_paths(RayConfig(address=ADDRESS), buckets)
    preflight.probe_cluster_paths(RayConfig(address=ADDRESS), buckets)
    assert not storage.is_uri("outputs/s3:/x") and storage.is_uri("file:///mnt/shared")
