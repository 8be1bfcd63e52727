"""Atomic checkpoint folders (crash mid-write, retention, incomplete folders) and the single-file export."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cadiff.errors import CheckpointError, ConfigError
from cadiff.runtime.exports import export_model, load_export, safe_load
from cadiff.train import checkpoint as ckpt
from cadiff.train.checkpoint import CheckpointManager, read_manifest


def write_state(folder, step: int) -> None:
    """What a strategy writes: a few tensor files, one in a subfolder (like deepspeed/ or dcp/)."""
    torch.save({"w": torch.full((4,), float(step))}, folder / "model.pt")
    (folder / "sub").mkdir()
    torch.save({"step": step}, folder / "sub" / "extra_rank00000.pt")


def save_step(manager: CheckpointManager, step: int):
    tmp = manager.tmp_dir(step)
    write_state(tmp, step)
    return manager.commit(tmp, step)


def saved_step(path) -> int:
    return int(safe_load(path / "model.pt")["w"][0])


def test_commit_writes_manifest_and_latest_finds_it(tmp_path):
    manager = CheckpointManager(tmp_path, num_to_keep=2)
    assert manager.latest() is None
    final = save_step(manager, 7)
    assert final == tmp_path / "checkpoints" / "step_00000007"
    manifest = json.loads((final / "COMPLETE").read_text())
    assert manifest["step"] == 7
    assert set(manifest["files"]) == {"model.pt", "sub/extra_rank00000.pt"}
    assert manifest["files"]["model.pt"] == (final / "model.pt").stat().st_size
    assert manager.latest() == final
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000007"]  # no temp leftovers


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, num_to_keep=1)
    save_step(manager, 1)
    tmp = manager.tmp_dir(2)
    with pytest.raises(KeyboardInterrupt):
        torch.save({"w": torch.zeros(4)}, tmp / "model.pt")
        raise KeyboardInterrupt  # the writer dies before commit
    assert manager.latest().name == "step_00000001"
    assert saved_step(manager.latest()) == 1
    # the next attempt starts from a clean temp folder and succeeds
    save_step(manager, 2)
    assert saved_step(manager.latest()) == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_crash_during_commit_rename_keeps_previous(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, num_to_keep=1)
    save_step(manager, 1)
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(src).startswith(".tmp_step_"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    tmp = manager.tmp_dir(2)
    write_state(tmp, 2)
    with pytest.raises(OSError, match="disk full"):
        manager.commit(tmp, 2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert saved_step(manager.latest()) == 1
    assert manager.checkpoints() == [tmp_path / "checkpoints" / "step_00000001"]


def test_latest_ignores_incomplete_or_damaged_folders(tmp_path):
    manager = CheckpointManager(tmp_path, num_to_keep=5)
    good = save_step(manager, 1)
    root = tmp_path / "checkpoints"
    # no marker (e.g. copied in by hand or a pre-rename crash of another tool)
    (root / "step_00000009").mkdir()
    torch.save({"w": torch.zeros(4)}, root / "step_00000009" / "model.pt")
    # truncated file behind a valid-looking marker
    bad = save_step(manager, 5)
    with open(bad / "model.pt", "r+b") as fh:
        fh.truncate(10)
    # unreadable marker
    junk = save_step(manager, 6)
    (junk / "COMPLETE").write_text("{not json")
    # marker of another step (folder renamed by hand)
    moved = save_step(manager, 3)
    os.replace(moved, root / "step_00000008")
    assert read_manifest(root / "step_00000008") is None
    assert manager.latest() == good
    assert manager.checkpoints() == [good]


def test_num_to_keep_retention(tmp_path):
    manager = CheckpointManager(tmp_path, num_to_keep=2)
    for step in range(1, 6):
        save_step(manager, step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    assert saved_step(manager.latest()) == 5
    with pytest.raises(ConfigError, match="num_to_keep"):
        CheckpointManager(tmp_path, num_to_keep=0)


def test_retention_never_deletes_the_only_good_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, num_to_keep=1)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_00000050").mkdir()  # incomplete newer folder must not count as "kept"
    save_step(manager, 4)
    assert manager.checkpoints() == [root / "step_00000004"]
    assert saved_step(manager.latest()) == 4


def test_recommit_of_same_step_replaces_and_survives_crash_between_renames(tmp_path):
    manager = CheckpointManager(tmp_path, num_to_keep=2)
    save_step(manager, 3)
    tmp = manager.tmp_dir(3)
    torch.save({"w": torch.full((4,), 33.0)}, tmp / "model.pt")
    manager.commit(tmp, 3)
    assert saved_step(manager.latest()) == 33
    # crash after moving the old copy aside but before the new one was renamed in: the old copy is found
    root = tmp_path / "checkpoints"
    os.replace(root / "step_00000003", root / ".replaced_step_00000003")
    assert manager.latest() == root / ".replaced_step_00000003"
    manager.tmp_dir(4)  # the next writer restores it under its real name
    assert manager.latest() == root / "step_00000003"
    assert saved_step(manager.latest()) == 33


def test_commit_of_missing_tmp_raises(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="tmp_dir"):
        manager.commit(tmp_path / "nope", 1)


# ---------------------------------------------------------------------------------------------------------
# export


def model_config() -> dict:
    return {"kind": "diffae", "z_channels": 8, "channel_mult": [1, 2], "temporal_downsample": 4}


def test_export_round_trip_loads_with_weights_only(tmp_path):
    state = {"enc.weight": torch.randn(3, 4), "enc.bias": torch.randn(3), "step_buf": torch.tensor(5)}
    cfg = {**model_config(), "patch": (1, 2, 2), "scale": np.float32(0.5)}
    meta = {"step": 10, "data": OmegaConf.create({"root": "x", "stats": [1.0, 2.0]}), "path": tmp_path}
    manager = CheckpointManager(tmp_path / "run")
    path = manager.export(tmp_path / "run" / "export" / "model.pt", state, cfg, meta)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cadiff-export"
    got_state, got_cfg, got_meta = load_export(path, expected_config=model_config())
    for k, v in state.items():
        assert torch.equal(got_state[k], v)
    assert got_cfg["patch"] == [1, 2, 2] and got_cfg["scale"] == 0.5
    assert got_meta == {"step": 10, "data": {"root": "x", "stats": [1.0, 2.0]}, "path": str(tmp_path)}
    # a run folder resolves to its export/model.pt
    assert torch.equal(manager.load_export(tmp_path / "run")[0]["enc.bias"], state["enc.bias"])
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_load_export_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_export(tmp_path / "missing.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="export/model.pt"):
        load_export(tmp_path / "empty_run")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a cadiff export"):
        load_export(tmp_path / "plain.pt")
    export_model(tmp_path / "m.pt", {"w": torch.zeros(2)}, model_config(), {})
    with pytest.raises(CheckpointError, match="z_channels: export has 8, expected 4"):
        load_export(tmp_path / "m.pt", expected_config={**model_config(), "z_channels": 4})
    with pytest.raises(CheckpointError, match="latent_reg: missing"):
        load_export(tmp_path / "m.pt", expected_config={"latent_reg": "kl"})


def test_export_rejects_non_plain_values_and_leaves_no_file(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="model_config.act"):
        export_model(tmp_path / "a.pt", {"w": torch.zeros(1)}, {"act": torch.nn.SiLU()}, {})
    with pytest.raises(CheckpointError, match="not tensors"):
        export_model(tmp_path / "b.pt", {"w": [0.0]}, model_config(), {})

    def dying_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("killed")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="killed"):
        export_model(tmp_path / "c.pt", {"w": torch.zeros(1)}, model_config(), {})
    assert list(tmp_path.iterdir()) == []


class Payload:
    """Not an allowed global for weights_only loads (stands for arbitrary pickled code)."""


def test_safe_load_refuses_missing_corrupt_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        safe_load(tmp_path / "missing.pt")
    torch.save({"w": torch.zeros(100)}, tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        safe_load(tmp_path / "cut.pt")
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"obj": Payload()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pt.*weights_only"):
        safe_load(tmp_path / "evil.pt")
    torch.save({"obj": Payload()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="evil2.pt"):
        safe_load(tmp_path / "evil2.pt")
