"""cluster/: launcher configs against Ray's autoscaler schema, KubeRay manifests, the SLURM script, and every
`python jobs/<job>.py ...` entrypoint written in these files (README included) composing with its job."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.tune.space import load_space

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
KNOWN_JOBS = ("prepare_data", "train_ae", "encode_latents", "train_latent", "sample", "evaluate", "sweep")
EXPERIMENT_DIR = REPO / "cadiff" / "conf" / "experiment"
SPACES_DIR = REPO / "search_spaces"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _autoscaler_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# cluster launcher (aws / gcp)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_ray_schema(name):
    """The JSON schema shipped in the installed ray package, then Ray's own prepare + validate (as `ray up`)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(name)
    jsonschema.validate(cfg, _autoscaler_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_schema_check_is_not_vacuous():
    cfg = _load("aws.yaml")
    schema = _autoscaler_schema()
    for broken in (
        {k: v for k, v in cfg.items() if k != "provider"},
        {**cfg, "idle_timeout": 5},
        {**cfg, "available_node_types": {**cfg["available_node_types"], "bad": {"resources": {"CPU": 1}}}},
        {**cfg, "docker": {**cfg["docker"], "imag": "x"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_layout(name):
    """CPU-only head, CPU data workers, GPU training workers, autoscaling bounds, idle timeout, setup."""
    cfg = _load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    cpu_workers = [v for v in workers.values() if v["resources"].get("CPU", 0) > 0 and not v["resources"].get("GPU")]
    gpu_workers = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    assert cpu_workers and gpu_workers
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert cfg["max_workers"] == sum(v["max_workers"] for v in workers.values())
    assert cfg["idle_timeout_minutes"] > 0
    # the code is mounted and installed on every node, torch first (overridable), then the package editable
    assert cfg["file_mounts"]["~/cadiff"] == "."
    setup = " ; ".join(cfg["setup_commands"])
    assert "${TORCH_SPEC:-torch==2.13.0}" in setup and "pip install --quiet -e ~/cadiff" in setup
    assert "-e TORCH_SPEC=torch==2.13.0" in cfg["docker"]["run_options"]
    assert "-e RAY_TRAIN_V2_ENABLED=1" in cfg["docker"]["run_options"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_images_match_installed_ray(name):
    """The cluster's Ray must equal the client's: image tags follow the installed ray version."""
    cfg = _load(name)
    images = [cfg["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in cfg["available_node_types"].values() if "docker" in t
    ]
    assert len(images) == 2
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-{py}-"), image


# ---------------------------------------------------------------------------------------------------------
# KubeRay


def ray_cluster_spec_problems(spec: dict, where: str) -> list[str]:
    """Required RayCluster spec fields (ray.io/v1) and autoscaling bounds; [] when the spec is complete."""
    problems = []
    if not spec.get("enableInTreeAutoscaling"):
        problems.append(f"{where}: enableInTreeAutoscaling must be true")
    head = spec.get("headGroupSpec")
    groups = [("headGroupSpec", head)] if isinstance(head, dict) else []
    if not groups:
        problems.append(f"{where}: missing headGroupSpec")
    workers = spec.get("workerGroupSpecs")
    if not isinstance(workers, list) or not workers:
        problems.append(f"{where}: missing workerGroupSpecs")
        workers = []
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(workers)]
    for name, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.{name}: rayStartParams must be a mapping of strings")
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers")
        if not containers or not all(c.get("name") and c.get("image") for c in containers):
            problems.append(f"{where}.{name}: template.spec.containers needs name and image")
        if name != "headGroupSpec":
            if not group.get("groupName"):
                problems.append(f"{where}.{name}: missing groupName")
            lo, n, hi = group.get("minReplicas"), group.get("replicas", 0), group.get("maxReplicas")
            if not (isinstance(lo, int) and isinstance(hi, int) and lo <= n <= hi):
                problems.append(f"{where}.{name}: need minReplicas <= replicas <= maxReplicas")
    return problems


def _by_kind(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d.get("kind") == kind]
    return doc


def _gpu_request(group: dict) -> int:
    containers = group["template"]["spec"]["containers"]
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def test_raycluster_manifest():
    doc = _by_kind("kuberay/raycluster.yaml", "RayCluster")
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert ray_cluster_spec_problems(spec, "RayCluster") == []
    assert spec["rayVersion"] == ray.__version__
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = {g["groupName"]: _gpu_request(g) for g in spec["workerGroupSpecs"]}
    assert any(v > 0 for v in gpus.values()) and any(v == 0 for v in gpus.values()), gpus


def test_rayjob_manifest():
    doc = _by_kind("kuberay/rayjob.yaml", "RayJob")
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python jobs/train_ae.py ")
    assert ray_cluster_spec_problems(spec["rayClusterSpec"], "RayJob.rayClusterSpec") == []
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/cadiff"
    # one cluster definition: the RayJob embeds exactly the RayCluster's spec
    assert spec["rayClusterSpec"] == _by_kind("kuberay/raycluster.yaml", "RayCluster")["spec"]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_volumes_reference_the_shared_claim(name):
    claims = {d["metadata"]["name"] for d in _docs(name) if d.get("kind") == "PersistentVolumeClaim"}
    text = (CLUSTER / name).read_text()
    assert claims and set(re.findall(r"claimName: (\S+)", text)) == claims
    for d in _docs(name):
        if d.get("kind") == "PersistentVolumeClaim":
            assert d["spec"]["accessModes"] == ["ReadWriteMany"]


def test_ray_cluster_spec_check_is_not_vacuous():
    spec = _by_kind("kuberay/raycluster.yaml", "RayCluster")["spec"]
    for mutate, expected in (
        (lambda s: s.pop("headGroupSpec"), "missing headGroupSpec"),
        (lambda s: s.update(workerGroupSpecs=[]), "missing workerGroupSpecs"),
        (lambda s: s["workerGroupSpecs"][0].pop("rayStartParams"), "rayStartParams"),
        (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "rayStartParams"),
        (lambda s: s["workerGroupSpecs"][1]["template"]["spec"].update(containers=[]), "containers"),
        (lambda s: s["workerGroupSpecs"][0].update(minReplicas=9), "minReplicas"),
        (lambda s: s.update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
    ):
        broken = copy.deepcopy(spec)
        mutate(broken)
        problems = ray_cluster_spec_problems(broken, "x")
        assert any(expected in p for p in problems), (expected, problems)


# ---------------------------------------------------------------------------------------------------------
# security: token authentication, dashboard binding, shared storage permissions

TOKEN_SECRET = {"name": "cadiff-ray-token", "key": "auth_token"}


def _commands(cfg: dict) -> str:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return "\n".join(c for k in keys for c in cfg.get(k) or [])


def launcher_security_problems(cfg: dict) -> list[str]:
    """Token auth on every node (env + the mounted token), dashboard on loopback, /mnt/shared not world-writable."""
    problems = []
    run_options = cfg["docker"]["run_options"]
    if "-e RAY_AUTH_MODE=token" not in run_options:
        problems.append("docker.run_options: needs -e RAY_AUTH_MODE=token")
    if cfg.get("file_mounts", {}).get("~/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("file_mounts: needs the token mounted at ~/.ray/auth_token")
    commands = _commands(cfg)
    hosts = re.findall(r"--dashboard-host[= ](\S+)", commands)
    if not hosts or set(hosts) != {"127.0.0.1"}:
        problems.append(f"head_start_ray_commands: dashboard must bind --dashboard-host=127.0.0.1, got {hosts}")
    if re.search(r"chmod\s+(-R\s+)?([0-7]?[0-7][0-7][2367]\b|\S*o\+\S*w|a\+\S*w)", commands):
        problems.append("initialization_commands: a world-writable chmod")
    gid = re.search(r"groupadd -f -g (\d+) (\w+)", commands)
    if not gid or f"--group-add {gid.group(1)}" not in run_options:
        problems.append("a fixed-gid group made by groupadd must be joined by the container (--group-add)")
    elif not re.search(rf"chgrp {gid.group(2)} /mnt/shared && sudo chmod 2775 /mnt/shared", commands):
        problems.append("/mnt/shared must be owned by that group, mode 2775")
    return problems


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_security(name):
    assert launcher_security_problems(_load(name)) == []


def test_launcher_security_check_is_not_vacuous():
    cfg = _load("aws.yaml")
    init = cfg["initialization_commands"][-1]
    start = cfg["head_start_ray_commands"][-1]
    for mutate, expected in (
        (lambda c: c["docker"]["run_options"].remove("-e RAY_AUTH_MODE=token"), "RAY_AUTH_MODE"),
        (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), "token mounted"),
        (lambda c: c.update(head_start_ray_commands=[start.replace("127.0.0.1", "0.0.0.0")]), "dashboard"),
        (lambda c: c.update(initialization_commands=[init + " && sudo chmod 1777 /mnt/shared"]), "world-writable"),
        (lambda c: c.update(initialization_commands=[init + " && sudo chmod o+w /mnt/shared"]), "world-writable"),
        (lambda c: c["docker"]["run_options"].remove("--group-add 2000"), "--group-add"),
        (lambda c: c.update(initialization_commands=[init.replace("2775", "0755")]), "mode 2775"),
    ):
        broken = copy.deepcopy(cfg)
        mutate(broken)
        problems = launcher_security_problems(broken)
        assert any(expected in p for p in problems), (expected, problems)


def kuberay_auth_problems(containers: list[dict], where: str) -> list[str]:
    """Each container runs with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the cluster's token secret."""
    problems = []
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{where}/{c.get('name')}: needs RAY_AUTH_MODE=token")
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        if ref != TOKEN_SECRET:
            problems.append(f"{where}/{c.get('name')}: RAY_AUTH_TOKEN must come from secret {TOKEN_SECRET}, got {ref}")
    return problems


def _cluster_containers(spec: dict) -> list[tuple[str, list[dict]]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]["containers"]) for name, g in groups]


def kuberay_security_problems(spec: dict) -> list[str]:
    problems = [p for name, cs in _cluster_containers(spec) for p in kuberay_auth_problems(cs, name)]
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
    if host != "127.0.0.1" and problems:
        problems.append(f"dashboard-host={host} without token auth")
    return problems


def test_kuberay_security():
    assert kuberay_security_problems(_by_kind("kuberay/raycluster.yaml", "RayCluster")["spec"]) == []
    rayjob = _by_kind("kuberay/rayjob.yaml", "RayJob")["spec"]
    assert kuberay_security_problems(rayjob["rayClusterSpec"]) == []
    # the submitter pod's `ray job submit` must send the token as well
    assert kuberay_auth_problems(rayjob["submitterPodTemplate"]["spec"]["containers"], "submitter") == []


def test_kuberay_security_check_is_not_vacuous():
    spec = _by_kind("kuberay/raycluster.yaml", "RayCluster")["spec"]
    broken = copy.deepcopy(spec)
    env = broken["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"]
    env[:] = [e for e in env if e["name"] != "RAY_AUTH_MODE"]
    assert any("gpu-train/ray-worker: needs RAY_AUTH_MODE=token" in p for p in kuberay_security_problems(broken))
    broken = copy.deepcopy(spec)
    head_env = broken["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in head_env if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"]["name"] = "other"
    assert any("dashboard-host=0.0.0.0 without token auth" in p for p in kuberay_security_problems(broken))


def test_readme_documents_the_token_secret():
    """The secret the manifests read is the one the README tells users to create."""
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {TOKEN_SECRET['name']} --from-file={TOKEN_SECRET['key']}=" in readme
    assert "ray get-auth-token --generate" in readme and "RAY_AUTH_MODE=token" in readme


# ---------------------------------------------------------------------------------------------------------
# SLURM


def _slurm_scripts() -> list[Path]:
    return sorted((CLUSTER / "slurm").glob("*.sh"))


def test_slurm_scripts_parse():
    scripts = _slurm_scripts()
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert text.startswith("#!/bin/bash\n") and "#SBATCH --nodes=" in text
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "ray start --head" in text and "ray start --address=" in text and "srun" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop the step options, answer `hostname --ip-address` with loopback, run the rest.
while [ "$#" -gt 0 ]; do
  case "$1" in
    -w) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
if [ "$1" = hostname ]; then echo "127.0.0.1"; exit 0; fi
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf '%s\\n' $FAKE_NODES
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_starts_head_and_workers_and_returns_job_status(tmp_path):
    """Two fake nodes on this machine: a head and a worker join, the job sees both, its exit status is kept."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SLURM_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        FAKE_NODES="node1 node2",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_CPUS_PER_TASK="1",
        CADIFF_ROOT=str(REPO),
        CADIFF_VENV=str(Path(sys.executable).parent.parent),
        RAY_PORT=str(_free_port()),
        RAY_WAIT_S="90",
        # loopback-only fake nodes: a token left in ~/.ray by other Ray sessions would make `ray start` demand
        # auth that the in-script `ray.init` client does not send
        RAY_AUTH_MODE="disabled",
    )
    job = "import os, ray; ray.init(address=os.environ['RAY_ADDRESS']); print('NODES', len(ray.nodes())); raise SystemExit(3)"
    proc = subprocess.Popen(
        ["bash", str(_slurm_scripts()[0]), sys.executable, "-c", job],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the session this test started, and only it
        out, _ = proc.communicate()
        pytest.fail(f"sbatch script timed out:\n{out[-3000:]}")
    assert "2/2 Ray node(s) up" in out, out[-3000:]
    assert "NODES 2" in out, out[-3000:]
    assert proc.returncode == 3, out[-3000:]


# ---------------------------------------------------------------------------------------------------------
# entrypoints written in the cluster files

ENTRYPOINT_FILES = [
    "aws.yaml",
    "gcp.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    *[str(p.relative_to(CLUSTER)) for p in _slurm_scripts()],
    "README.md",
]
_ENTRYPOINT_RE = re.compile(r"\bpython3?\s+jobs/([\w<>]+)\.py((?:[ \t]+[^\s;&|()'\"`#]+)*)")


def extract_entrypoints(text: str) -> list[tuple[str, list[str]]]:
    """(job, overrides) of every `python jobs/<job>.py k=v ...` in shell, YAML or Markdown text."""
    text = re.sub(r"\\\n", " ", text)  # shell line continuations
    out = []
    for match in _ENTRYPOINT_RE.finditer(text):
        args = [a for a in match.group(2).split() if a != "..."]  # prose writes "python jobs/x.py ..."
        out.append((match.group(1), args))
    return out


def _yaml_strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _yaml_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _yaml_strings(v)]
    return []


def file_entrypoints(name: str) -> list[tuple[str, list[str]]]:
    """Entrypoints of a cluster file: YAML string values (folded scalars joined) and comment lines; all of
    a shell script or Markdown file."""
    text = (CLUSTER / name).read_text()
    if not name.endswith(".yaml"):
        return extract_entrypoints(text)
    found = [e for s in _yaml_strings(list(yaml.safe_load_all(text))) for e in extract_entrypoints(s)]
    comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if line.lstrip().startswith("#"))
    return found + extract_entrypoints(comments)


def check_entrypoint(job: str, args: list[str]) -> None:
    """A known job, existing experiment / search space, and overrides that compose with the job's config."""
    if job not in KNOWN_JOBS:
        raise ConfigError(f"jobs/{job}.py is not a cadiff job (expected one of {list(KNOWN_JOBS)})")
    overrides = []
    for arg in args:
        if "$" in arg:
            raise ConfigError(f"{job}: override {arg!r} uses a shell variable; entrypoints must be literal")
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{job}: argument {arg!r} is not a key=value override")
        if key == "experiment" and not (EXPERIMENT_DIR / f"{value}.yaml").is_file():
            raise ConfigError(f"{job}: experiment={value} has no cadiff/conf/experiment/{value}.yaml")
        if key == "space" and not (SPACES_DIR / f"{value}.yaml").is_file():
            raise ConfigError(f"{job}: space={value} has no search_spaces/{value}.yaml")
        overrides.append(arg)
    cfg = compose(job, overrides)  # paths (data.root, out_root, ...) are not required to exist here
    if job == "sweep":
        load_space(cfg.space, cfg.stage, experiment=cfg.experiment, check_compose=False)


def test_extract_entrypoints_handles_shell_yaml_and_prose():
    text = (
        'CMD=(python jobs/train_ae.py experiment=ae_tiny run_name=a)\n'
        "ray job submit -- \\\n    python jobs/sweep.py space=latent_size \\\n    stage=ae  # comment\n"
        "runs `python jobs/train_latent.py ...` and python3 jobs/sample.py stage2=x; echo done\n"
        "every `python jobs/<job>.py ...` line\n"
    )
    assert extract_entrypoints(text) == [
        ("train_ae", ["experiment=ae_tiny", "run_name=a"]),
        ("sweep", ["space=latent_size", "stage=ae"]),
        ("train_latent", []),
        ("sample", ["stage2=x"]),
        ("<job>", []),
    ]


def test_every_cluster_file_has_an_entrypoint():
    for name in ENTRYPOINT_FILES:
        if name == "kuberay/raycluster.yaml":
            continue  # a bare cluster: jobs are submitted to it, as the README shows
        assert file_entrypoints(name), name


@pytest.mark.parametrize(
    "job,args,message",
    [
        ("train_foo", [], "not a cadiff job"),
        ("train_ae", ["experiment=ae_huge"], "experiment=ae_huge"),
        ("sweep", ["space=nope"], "space=nope"),
        ("train_ae", ["trainer.num_workerz=2"], "num_workerz"),
        ("train_ae", ["strategy=zero9"], "strategy"),
        ("train_ae", ["trainer.num_workers=$N"], "shell variable"),
        ("train_ae", ["--fast"], "not a key=value"),
        ("sweep", ["space=dit_width", "stage=ae"], "not stage 'ae'"),
    ],
)
def test_entrypoint_check_rejects(job, args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_entrypoint(job, args)


def _all_entrypoints() -> list:
    params = []
    for name in ENTRYPOINT_FILES:
        for i, (job, args) in enumerate(file_entrypoints(name)):
            if job == "<job>":  # the README's placeholder
                continue
            params.append(pytest.param(job, args, id=f"{name}:{i}:{job}"))
    return params


@pytest.mark.parametrize("job,args", _all_entrypoints())
def test_cluster_entrypoint_composes(job, args):
    check_entrypoint(job, args)
