"""Atomic checkpoint folders (crash mid-write, retention, incomplete folders), verified resume (sha256 manifests,
fallback past damaged checkpoints, trainer.resume_from, Ray Train's record) and the single-file export."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cadiff.config import compose
from cadiff.errors import CheckpointError, ConfigError
from cadiff.models.registry import build_model
from cadiff.models.unet3d import UNet3D
from cadiff.runtime.exports import export_model, load_export, load_exported_model, safe_load
from cadiff.testing.faults import CORRUPTIONS, corrupt_checkpoint_file
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


# ---------------------------------------------------------------------------------------------------------
# verified resume: sha256 manifests, fallback past damaged checkpoints, trainer.resume_from (strategy=single)


class Net(torch.nn.Module):
    """16 KiB of weights: room for 4 KiB of damage inside one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = torch.nn.Linear(64, 64)


def single_strategy():
    from cadiff.config import StrategyConfig, TrainerConfig
    from cadiff.train.ema import EMA
    from cadiff.train.strategies import build_strategy

    strategy = build_strategy(StrategyConfig(name="single"), TrainerConfig(max_steps=8, warmup_steps=1))
    strategy.setup(Net(), torch.device("cpu"))
    return strategy, EMA(strategy.ema_tensors(), decay=0.9)


def train_and_save(run_dir, steps=(2, 4)):
    """A run whose checkpoint of step s holds decoder weights all equal to s."""
    manager = CheckpointManager(run_dir, num_to_keep=5)
    strategy, ema = single_strategy()
    for step in steps:
        with torch.no_grad():
            for p in strategy.module.parameters():
                p.fill_(float(step))
        extra = {"step": step, "ema": ema.state_dict(), "rng": {"torch": torch.get_rng_state()}}
        tmp = manager.tmp_dir(step)
        strategy.save(tmp, extra)
        manager.commit(tmp, step)
    return manager


def resume_into_fresh(run_dir, resume_dir=None):
    """What a worker does at start-up (strategy=single): returns (step, decoder weights)."""
    from types import SimpleNamespace

    from cadiff.train.loop import Reporter, resume_state

    strategy, ema = single_strategy()
    run = SimpleNamespace(resume_dir=resume_dir, use_ray=False, rank=0)
    step, _rng = resume_state(run, Reporter(False, run_dir, 5), strategy, ema)
    return step, strategy.module.decoder.weight.detach().clone()


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_manifest_holds_sha256_of_every_file(tmp_path):
    final = save_step(CheckpointManager(tmp_path), 3)
    manifest = json.loads((final / "COMPLETE").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) == {"model.pt", "sub/extra_rank00000.pt"}
    assert manifest["sha256"]["model.pt"] == hashlib.sha256((final / "model.pt").read_bytes()).hexdigest()
    ckpt.verify_checkpoint(final)


@pytest.mark.parametrize("where", CORRUPTIONS)
def test_damaged_latest_at_equal_size_falls_back_to_previous_and_is_set_aside(tmp_path, caplog, where):
    train_and_save(tmp_path)
    latest = tmp_path / "checkpoints" / "step_00000004"
    corrupt_checkpoint_file(latest / "model.pt", where)
    damaged = (latest / "model.pt").read_bytes()
    assert ckpt.read_manifest(latest) is not None, "listing checks sizes only: the damage is invisible to it"
    with caplog.at_level("WARNING", logger="cadiff.train.checkpoint"):
        step, weights = resume_into_fresh(tmp_path)
    assert step == 2 and torch.equal(weights, torch.full((64, 64), 2.0))
    assert names(tmp_path) == [".corrupt_step_00000004", "step_00000002"]
    assert (tmp_path / "checkpoints" / ".corrupt_step_00000004" / "model.pt").read_bytes() == damaged  # kept
    text = caplog.text
    assert "step_00000004" in text and "model.pt fails its sha256 check" in text and "trying the previous one" in text
    assert "set aside as '.corrupt_step_00000004'" in text
    # the run goes on: a new step 4 commits where the damaged one was
    assert save_step(CheckpointManager(tmp_path, num_to_keep=5), 4).name == "step_00000004"


def test_without_damage_the_latest_is_resumed(tmp_path):
    train_and_save(tmp_path)
    step, weights = resume_into_fresh(tmp_path)
    assert step == 4 and torch.equal(weights, torch.full((64, 64), 4.0))
    assert names(tmp_path) == ["step_00000002", "step_00000004"]


def test_old_manifest_without_sha256_loads_by_size_and_an_unloadable_one_falls_back(tmp_path, caplog):
    train_and_save(tmp_path)
    root = tmp_path / "checkpoints"
    for folder in root.iterdir():  # manifests as earlier versions wrote them
        manifest = json.loads((folder / "COMPLETE").read_text())
        del manifest["sha256"]
        (folder / "COMPLETE").write_text(json.dumps(manifest))
    with caplog.at_level("INFO", logger="cadiff.train.checkpoint"):
        assert resume_into_fresh(tmp_path)[0] == 4
    assert "without sha256" in caplog.text and "checked by size only" in caplog.text
    corrupt_checkpoint_file(root / "step_00000004" / "model.pt", "header")  # no digest to notice: the load fails
    caplog.clear()
    with caplog.at_level("WARNING", logger="cadiff.train.checkpoint"):
        assert resume_into_fresh(tmp_path)[0] == 2
    assert "does not load" in caplog.text and "model.pt" in caplog.text
    assert names(tmp_path) == [".corrupt_step_00000004", "step_00000002"]


def test_when_no_checkpoint_loads_one_error_lists_them_and_nothing_moves(tmp_path):
    train_and_save(tmp_path)
    for step in (2, 4):
        corrupt_checkpoint_file(tmp_path / "checkpoints" / f"step_{step:08d}" / "model.pt", "tensor_data")
    with pytest.raises(CheckpointError) as info:
        resume_into_fresh(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.index("step_00000004") < message.index("step_00000002")  # newest first
    assert message.count("fails its sha256 check") == 2 and "Nothing was moved" in message
    assert names(tmp_path) == ["step_00000002", "step_00000004"]


def test_resume_from_step_sets_newer_checkpoints_aside(tmp_path, caplog):
    train_and_save(tmp_path, steps=(2, 4, 6))
    with caplog.at_level("WARNING", logger="cadiff.train.checkpoint"):
        target = ckpt.prepare_resume(tmp_path, 4, use_ray=False)
    assert target == tmp_path / "checkpoints" / "step_00000004"
    assert names(tmp_path) == [".superseded_step_00000006", "step_00000002", "step_00000004"]
    assert "trainer.resume_from=4" in caplog.text and ".superseded_step_00000006" in caplog.text
    step, weights = resume_into_fresh(tmp_path, target)
    assert step == 4 and torch.equal(weights, torch.full((64, 64), 4.0))
    # a checkpoint this session writes after the chosen one is preferred by a restart, the choice is not
    save_step(CheckpointManager(tmp_path, num_to_keep=5), 5)
    assert ckpt.resume_candidates(CheckpointManager(tmp_path).candidates(), target) == [
        tmp_path / "checkpoints" / "step_00000005", target]


def test_resume_from_path_of_another_run(tmp_path):
    train_and_save(tmp_path / "other", steps=(3,))
    source = tmp_path / "other" / "checkpoints" / "step_00000003"
    train_and_save(tmp_path / "run", steps=(2, 3, 4))
    target = ckpt.prepare_resume(tmp_path / "run", str(source), use_ray=False)
    assert target == source
    # from the chosen step on, this run's own checkpoints make way (kept); older ones stay
    assert names(tmp_path / "run") == [".superseded_step_00000003", ".superseded_step_00000004", "step_00000002"]
    assert resume_into_fresh(tmp_path / "run", target)[0] == 3
    assert names(tmp_path / "other") == ["step_00000003"]  # the source is only read


def test_resume_from_missing_or_damaged_checkpoint_is_one_line_error(tmp_path):
    train_and_save(tmp_path)
    with pytest.raises(CheckpointError, match=r"trainer\.resume_from=7: no checkpoint folder '.*step_00000007'; "
                                              r"this run has step_00000002, step_00000004$"):
        ckpt.prepare_resume(tmp_path, 7, use_ray=False)
    with pytest.raises(CheckpointError, match=r"trainer\.resume_from='.*nowhere': no checkpoint folder"):
        ckpt.prepare_resume(tmp_path, str(tmp_path / "nowhere"), use_ray=False)
    corrupt_checkpoint_file(tmp_path / "checkpoints" / "step_00000002" / "model.pt", "tensor_data")
    with pytest.raises(CheckpointError) as info:
        ckpt.prepare_resume(tmp_path, 2, use_ray=False)
    assert "\n" not in str(info.value)
    assert re.search(r"trainer\.resume_from=2: checkpoint '.*step_00000002' cannot be resumed: model\.pt fails its "
                     r"sha256 check .* \(nothing was moved\)$", str(info.value))
    (tmp_path / "checkpoints" / "step_00000004" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no COMPLETE manifest"):
        ckpt.prepare_resume(tmp_path, 4, use_ray=False)
    assert names(tmp_path) == ["step_00000002", "step_00000004"]


def test_resume_from_is_typed_at_config_load():
    from cadiff.config import TrainerConfig, compose, validate_trainer

    assert compose("train_ae", ["experiment=ae_tiny", "trainer.resume_from=4"]).trainer.resume_from == 4
    with pytest.raises(ConfigError, match=r"trainer\.resume_from' = 2\.5: expected null \(the latest checkpoint\), a "
                                          "checkpoint step >= 1 or a checkpoint folder path"):
        compose("train_ae", ["experiment=ae_tiny", "trainer.resume_from=2.5"])
    for good in (None, 1, "outputs/train_ae/r1/checkpoints/step_00000004"):
        validate_trainer(OmegaConf.structured(TrainerConfig(resume_from=good)))
    for bad in (0, True, " ", [4]):
        with pytest.raises(ConfigError, match=r"trainer\.resume_from"):
            validate_trainer(OmegaConf.structured(TrainerConfig(resume_from=bad)))


# ---------------------------------------------------------------------------------------------------------
# Ray Train layout: per-rank manifests, and the driver's check of registered checkpoints


def ray_folder(root, step: int, world: int = 1):
    """A checkpoint as Ray Train merges it: each rank's part with its COMPLETE_rank manifest."""
    folder = root / f"step_{step:08d}"
    for rank in range(world):
        part = root / f".part{rank}"
        part.mkdir(parents=True)
        torch.save({"w": torch.full((1024,), float(step))}, part / f"extra_rank{rank:05d}.pt")
        ckpt.write_manifest(part, step, rank=rank)
        if world > 1:  # stand-in for the other ranks of a process group
            manifest = json.loads((part / f"COMPLETE_rank{rank:05d}").read_text())
            (part / f"COMPLETE_rank{rank:05d}").write_text(json.dumps({**manifest, "world_size": world}))
        shutil.copytree(part, folder, dirs_exist_ok=True)
        shutil.rmtree(part)
    return folder


def ray_record(root, steps):
    entries = [{"version": 0, "checkpoint_dir_name": f"step_{s:08d}", "metrics": {"step": s}} for s in steps]
    record = {"ray_version": "2.60.0", "checkpoint_results": entries, "checkpoint_report_indices": list(range(len(steps))),
              "latest_checkpoint_result": entries[-1], "pending_training_results": [], "pending_validation_specs": [],
              "current_report_index": len(steps), "validated_checkpoint_dir_names": [],
              "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    (root / ckpt.RAY_SNAPSHOT).write_text(json.dumps(record))


def test_rank_manifests_merge_and_a_missing_rank_fails(tmp_path):
    folder = ray_folder(tmp_path, 5, world=2)
    manifest = ckpt.load_manifest(folder)
    assert manifest["step"] == 5 and set(manifest["files"]) == {"extra_rank00000.pt", "extra_rank00001.pt"}
    ckpt.verify_checkpoint(folder)
    (folder / "COMPLETE_rank00001").unlink()
    with pytest.raises(CheckpointError, match=r"manifests of ranks \[0\] for world size 2: a rank's part is missing"):
        ckpt.verify_checkpoint(folder)
    assert ckpt.read_manifest(folder) is None


def test_driver_sets_aside_damaged_registered_checkpoint_and_repairs_ray_record(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        ray_folder(root, step)
    legacy = root / "step_00000001"  # registered by an earlier cadiff: no manifest at all
    legacy.mkdir()
    ray_record(root, [1, 3, 6])
    corrupt_checkpoint_file(root / "step_00000006" / "extra_rank00000.pt", "tensor_data")
    assert ckpt.prepare_resume(tmp_path, None, use_ray=True) is None
    assert sorted(p.name for p in root.iterdir()) == [".corrupt_step_00000006", ckpt.RAY_SNAPSHOT, "step_00000001",
                                                      "step_00000003"]
    record = json.loads((root / ckpt.RAY_SNAPSHOT).read_text())
    assert [e["checkpoint_dir_name"] for e in record["checkpoint_results"]] == ["step_00000001", "step_00000003"]
    assert record["checkpoint_report_indices"] == [0, 1]
    assert record["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000003"
    assert ckpt.ray_registered(root) == [root / "step_00000003", legacy]
    # every registered one damaged (the legacy one passes unchecked only when it is registered): one error
    corrupt_checkpoint_file(root / "step_00000003" / "extra_rank00000.pt", "header")
    (legacy / "COMPLETE").write_text("{")
    with pytest.raises(CheckpointError, match=r"no checkpoint Ray Train registered could be resumed; tried newest "
                                              r"first: '.*step_00000003' \(extra_rank00000.pt fails its sha256 check"):
        ckpt.prepare_resume(tmp_path, None, use_ray=True)
    assert (root / "step_00000003").is_dir() and legacy.is_dir()


def test_resume_from_with_ray_drops_superseded_checkpoints_from_ray_record(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        ray_folder(root, step)
    ray_record(root, [3, 6, 9])
    assert ckpt.prepare_resume(tmp_path, 6, use_ray=True) == root / "step_00000006"
    record = json.loads((root / ckpt.RAY_SNAPSHOT).read_text())
    assert [e["checkpoint_dir_name"] for e in record["checkpoint_results"]] == ["step_00000003", "step_00000006"]
    assert record["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000006"
    assert (root / ".superseded_step_00000009").is_dir()


def test_exports_written_before_mean_head_existed_load_their_unet_head(tmp_path):
    """A stage-1 export whose model config has no ``mean_head`` (written before the key existed, when the UNet on a
    blank input was the only head) rebuilds that head, not today's default, and its weights load."""
    overrides = ["experiment=ae_tiny", "model.mean_head=unet", "model.noise_std=0.3"]
    model = build_model(compose("train_ae", overrides).model)
    old_config = {k: v for k, v in model.model_config.items() if k != "mean_head"}
    export_model(tmp_path / "old.pt", model.state_dict(), old_config, {"stage": "ae"})
    loaded, _, _ = load_exported_model(tmp_path / "old.pt", "stage1", "ae")
    assert loaded.model_config["mean_head"] == "unet" and isinstance(loaded.mean_decoder, UNet3D)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # today's exports name the head they hold
    new = build_model(compose("train_ae", ["experiment=ae_tiny", "model.noise_std=0.3"]).model)
    export_model(tmp_path / "new.pt", new.state_dict(), new.model_config, {"stage": "ae"})
    assert load_export(tmp_path / "new.pt")[1]["mean_head"] == "upsampler"
