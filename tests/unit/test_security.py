"""Security checks (issue 8): safe deserialization everywhere, archive extraction that cannot escape its
folder, a local Ray dashboard on 127.0.0.1 by default, and wandb keys that never reach run records or logs."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from cadiff.config import JOB_SCHEMAS, RayConfig, compose
from cadiff.errors import DataError
from cadiff.runinfo import record_run, scrub_secrets

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("cadiff", "jobs")
FAKE_WANDB_KEY = "f00dfeedc0ffee0123456789abcdef0123456789"  # 40 hex characters, the shape of a wandb API key

# ---------------------------------------------------------------------------------------------------------
# unsafe deserialization: an AST scan of every module

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name/Attribute chain ('' for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """``file:line what`` for every deserialization that can execute code from the file it reads."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> dotted origin, from imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        where = f"{filename}:{node.lineno}"
        module, _, func = full.rpartition(".")
        if full == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where} torch.load without weights_only=True")
        elif module.split(".")[0] in PICKLE_MODULES and func in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where} {full}")
        elif full in ("pandas.read_pickle", "numpy.load") and (full == "pandas.read_pickle" or _is_true(_keyword(node, "allow_pickle"))):
            found.append(f"{where} {full} of pickled data")
        elif full in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all") or (
            full == "yaml.load" and _dotted(_keyword(node, "Loader") or ast.Constant(None)).split(".")[-1] in {"", *UNSAFE_YAML_LOADERS}
        ):
            found.append(f"{where} {full} with a code-executing loader")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in ("extractall", "extract"):
            found.append(f"{where} archive .{node.func.attr}() (members unchecked; use safe_extract_zip)")
    return found


@pytest.mark.parametrize(
    "snippet, bad",
    [
        ("import torch\ntorch.load('m.pt')", True),
        ("import torch\ntorch.load('m.pt', weights_only=False)", True),
        ("import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)", False),
        ("import torch as T\nT.load('m.pt')", True),
        ("from torch import load\nload('m.pt')", True),
        ("import pickle\npickle.load(open('x', 'rb'))", True),
        ("import pickle\npickle.loads(b'')", True),
        ("from pickle import loads as l\nl(b'')", True),
        ("import pickle\npickle.dumps(1)", False),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", True),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=False)", False),
        ("import yaml\nyaml.load(s)", True),
        ("import yaml\nyaml.load(s, Loader=yaml.FullLoader)", True),
        ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)", False),
        ("import yaml\nyaml.safe_load(s)", False),
        ("import tarfile\ntarfile.open('a.tar').extractall('out')", True),
    ],
)
def test_scanner_flags_unsafe_loads(snippet, bad):
    assert bool(unsafe_loads(snippet)) is bad, unsafe_loads(snippet)


def test_no_unsafe_deserialization_in_package_and_jobs():
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20, "scan found too few files: wrong root?"
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, "unsafe deserialization:\n" + "\n".join(found)


def test_custom_yaml_loader_is_safe():
    from cadiff.tune import space

    assert issubclass(space._Loader, yaml.SafeLoader)


def test_checkpoint_loader_refuses_pickled_objects(tmp_path):
    import pickle

    import torch

    from cadiff.errors import CheckpointError
    from cadiff.runtime.exports import safe_load

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights_only=True"):
        safe_load(path)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------------------
# archive extraction


def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/info.json", b"{}")
        for name, payload in members.items():
            zf.writestr(name, payload)
        if symlink is not None:
            info = zipfile.ZipInfo("data/link")
            info.external_attr = (0o120777 << 16)  # S_IFLNK: a symbolic link member
            zf.writestr(info, symlink)
    return path


@pytest.mark.parametrize(
    "member",
    ["../escaped.txt", "data/../../escaped.txt", "/tmp/cadiff-escaped.txt", "..\\escaped.txt", "C:/escaped.txt", "symlink"],
)
def test_zip_extraction_rejects_escaping_members(tmp_path, member):
    from cadiff.data.sources.download import safe_extract_zip

    work = tmp_path / "work"
    work.mkdir()
    if member == "symlink":
        archive = _zip(work / "a.zip", {}, symlink="/etc/passwd")
        expected = "symbolic link"
    else:
        archive = _zip(work / "a.zip", {member: b"escaped"})
        expected = r"unsafe member path .*absolute or '\.\.'"
    out = work / "out"
    with pytest.raises(DataError, match=f"a.zip.*{expected}"):
        safe_extract_zip(archive, out)
    assert not out.exists() and not list(work.glob(".out*")), "partial extraction left behind"
    assert not (tmp_path / "escaped.txt").exists() and not (work / "escaped.txt").exists()
    assert not Path("/tmp/cadiff-escaped.txt").exists()


def test_zip_extraction_of_a_clean_archive_stays_inside(tmp_path):
    from cadiff.data.sources.download import safe_extract_zip

    archive = _zip(tmp_path / "ok.zip", {"data/images/a.tiff": b"x"})
    out = safe_extract_zip(archive, tmp_path / "out")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["data/images/a.tiff", "data/info.json"]


# ---------------------------------------------------------------------------------------------------------
# local Ray binds its dashboard to 127.0.0.1 unless configured


def test_ray_config_defaults_are_local_only():
    assert RayConfig().dashboard_host == "127.0.0.1" and RayConfig().include_dashboard is False
    required = {"sample": ["stage2=outputs/train_latent/x"]}
    for job, schema in JOB_SCHEMAS.items():
        if "ray" in schema.__dataclass_fields__:
            cfg = compose(job, required.get(job, []))
            assert cfg.ray.dashboard_host == "127.0.0.1", job
            assert cfg.ray.include_dashboard is False, job


@pytest.mark.parametrize("overrides, host", [([], "127.0.0.1"), (["ray.dashboard_host=0.0.0.0", "ray.include_dashboard=true"], "0.0.0.0")])
def test_init_ray_passes_the_dashboard_host(monkeypatch, overrides, host):
    import ray

    from cadiff.train import launch

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    previous = signal.getsignal(signal.SIGTERM)
    # the test is about forwarding, whatever SIGINT handler an earlier test in this process left behind
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        launch.init_ray(compose("train_ae", overrides).ray)
        # SIGTERM now runs the SIGINT handler (Ray's core worker would abort the driver without cleanup)
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert len(calls) == 1 and calls[0]["address"] == "local"
    assert calls[0]["dashboard_host"] == host and calls[0]["include_dashboard"] is (host != "127.0.0.1")


# ---------------------------------------------------------------------------------------------------------
# wandb keys never reach run records or logs


def test_scrub_secrets_redacts_credential_keys_at_any_depth():
    cfg = {"logger": {"name": "wandb", "api_key": FAKE_WANDB_KEY, "WANDB_API_KEY": FAKE_WANDB_KEY},
           "hooks": [{"token": "t0k3n"}, {"password": "pw", "keep": 1}], "lr": 0.1}
    clean = scrub_secrets(cfg)
    assert FAKE_WANDB_KEY not in json.dumps(clean) and "t0k3n" not in json.dumps(clean) and '"pw"' not in json.dumps(clean)
    assert clean["logger"]["name"] == "wandb" and clean["hooks"][1]["keep"] == 1 and clean["lr"] == 0.1
    assert cfg["logger"]["api_key"] == FAKE_WANDB_KEY, "scrub_secrets must not modify its input"


def test_record_run_never_writes_a_key(tmp_path):
    record_run(tmp_path, {"seed": 1, "logger": {"name": "wandb", "wandb_api_key": FAKE_WANDB_KEY}}, "train_ae")
    assert all(FAKE_WANDB_KEY not in (tmp_path / name).read_text() for name in ("config.yaml", "run.json"))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["logger"]["wandb_api_key"] == "<redacted>"


@pytest.mark.slow
def test_wandb_key_in_environment_never_reaches_outputs_or_logs(sim_data_root, tmp_path):
    """A real (offline) wandb run with WANDB_API_KEY set: the key appears in no output file and no log line."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HYDRA_FULL_ERROR")}
    env.update(WANDB_API_KEY=FAKE_WANDB_KEY, WANDB_MODE="offline")
    cmd = [sys.executable, str(REPO / "jobs" / "train_ae.py"), "experiment=ae_tiny", "strategy=single",
           "trainer.num_workers=1", "trainer.max_steps=1", "logger=wandb", f"data.root={sim_data_root}",
           f"out_root={tmp_path}", "run_name=w", "--verbose"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert FAKE_WANDB_KEY not in result.stdout + result.stderr
    run_dir = tmp_path / "train_ae" / "w"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files), "no wandb offline run was written"
    leaked = [str(p) for p in files if FAKE_WANDB_KEY.encode() in p.read_bytes()]
    assert not leaked, f"wandb key written to {leaked}"
