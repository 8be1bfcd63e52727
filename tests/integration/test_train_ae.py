"""Stage-1 training on the shared local Ray cluster: strategies, resume, exports, media, bad configs."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.runtime.exports import load_export
from cadiff.train.launch import run_training

pytestmark = pytest.mark.ray


def _cfg(data_root: Path, out_root: Path, run_name: str, *extra: str):
    return compose(
        "train_ae",
        [
            "experiment=ae_tiny",
            f"data.root={data_root}",
            f"out_root={out_root}",
            f"run_name={run_name}",
            "trainer.num_workers=2",
            "trainer.cpus_per_worker=0.5",
            "trainer.log_every=1",
            "trainer.val_every=2",
            "trainer.ckpt_every=2",
            "ema.decay=0.9",
            *extra,
        ],
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_ddp_trains_writes_export_media_and_resumes(ray_cluster, sim_data_root, tmp_path):
    cfg = _cfg(sim_data_root, tmp_path, "r1", "strategy=ddp", "trainer.max_steps=4", "logger=wandb")
    sigint = signal.getsignal(signal.SIGINT)
    summary, path = run_training(cfg, "ae")
    assert signal.getsignal(signal.SIGINT) is sigint, "Ray Train's SIGINT handler must not outlive fit()"
    run_dir = Path(path)
    rows = _metrics(run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert rows[-1]["step"] == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert "val_loss" in rows[-1] and rows[-1]["samples_per_s"] > 0 and 0 < rows[-1]["mfu"]
    assert 0 <= rows[-1]["data_wait_frac"] < 1
    # latent-use telemetry: the val loss with the clips' own latents and with shuffled ones, per flow time
    assert {"val_loss_z", "val_loss_shuffled_z", "val_latent_use", "val_loss_z_t10", "val_loss_shuffled_z_t90"} <= set(rows[-1])
    assert rows[-1]["val_latent_use"] == pytest.approx(rows[-1]["val_loss_z"] / rows[-1]["val_loss_shuffled_z"])
    assert "val_latent_use=" in summary
    state, model_cfg, meta = load_export(run_dir / "export" / "model.pt")
    assert meta["step"] == 4 and model_cfg["kind"] == "diffae"
    # the trainer filled in the pixel noise model from the data index (Anscombe shards by default)
    assert model_cfg["decoder_form"] is None and model_cfg["noise_model"]["kind"] == "anscombe"
    assert any(k.startswith("mean_decoder.") for k in state)
    assert (run_dir / "config.yaml").exists() and json.loads((run_dir / "run.json").read_text())["git_revision"]
    assert list((run_dir / "checkpoints").glob("step_*")), "no Ray Train checkpoint was persisted"
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run folder missing"

    import imageio.v3 as iio

    gif = sorted((run_dir / "media").glob("recon_step*.gif"))[-1]
    mp4 = sorted((run_dir / "media").glob("recon_step*.mp4"))[-1]
    assert iio.imread(gif).shape[0] == 17
    assert iio.imread(mp4, plugin="pyav").shape[0] == 17

    # re-running with the same run name resumes from step 4 instead of starting over
    cfg2 = _cfg(sim_data_root, tmp_path, "r1", "strategy=ddp", "trainer.max_steps=6")
    run_training(cfg2, "ae")
    steps = [r["step"] for r in _metrics(run_dir)]
    assert steps[-1] == 6 and 1 not in steps[steps.index(4) + 1 :], f"resume restarted from scratch: {steps}"


def _export_state(path: str) -> dict[str, torch.Tensor]:
    state, _, _ = load_export(Path(path) / "export" / "model.pt")
    return state


@pytest.mark.slow
def test_exact_resume_ddp_deterministic(ray_cluster, sim_data_root, tmp_path):
    common = ("strategy=ddp", "data.deterministic=true")
    _, full = run_training(_cfg(sim_data_root, tmp_path, "full", *common, "trainer.max_steps=4"), "ae")
    run_training(_cfg(sim_data_root, tmp_path, "split", *common, "trainer.max_steps=4", "trainer.stop_at_step=2"), "ae")
    _, split = run_training(_cfg(sim_data_root, tmp_path, "split", *common, "trainer.max_steps=4"), "ae")
    a, b = _export_state(full), _export_state(split)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, f"2N steps != N + resume + N (max abs diff {worst})"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"])
def test_sharded_strategies_train_and_resume(ray_cluster, sim_data_root, tmp_path, strategy):
    cfg = _cfg(sim_data_root, tmp_path, strategy, f"strategy={strategy}", "trainer.max_steps=2")
    run_training(cfg, "ae")
    _, path = run_training(_cfg(sim_data_root, tmp_path, strategy, f"strategy={strategy}", "trainer.max_steps=4"), "ae")
    rows = _metrics(Path(path))
    assert rows[-1]["step"] == 4 and all(torch.isfinite(torch.tensor([r["loss"] for r in rows if "loss" in r])))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4], "resume did not continue from step 2"
    state = _export_state(path)
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.slow
def test_regression_ae_and_single_strategy(ray_cluster, sim_data_root, tmp_path):
    _, path = run_training(_cfg(sim_data_root, tmp_path, "reg", "model=regression_ae", "trainer.max_steps=2"), "ae")
    _, model_cfg, _ = load_export(Path(path) / "export" / "model.pt")
    assert model_cfg["kind"] == "regression"
    cfg = _cfg(sim_data_root, tmp_path, "single", "strategy=single", "trainer.num_workers=1", "trainer.max_steps=3")
    _, path = run_training(cfg, "ae")
    assert _metrics(Path(path))[-1]["step"] == 3
    assert (Path(path) / "checkpoints").is_dir()


def test_loss_falls_over_training(ray_cluster, sim_data_root, tmp_path):
    cfg = _cfg(sim_data_root, tmp_path, "fall", "strategy=ddp", "trainer.max_steps=30", "trainer.log_every=5",
               "trainer.val_every=30", "trainer.ckpt_every=30", "trainer.lr=3e-3")
    _, path = run_training(cfg, "ae")
    losses = [r["loss"] for r in _metrics(Path(path)) if "loss" in r]
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["strategy=zero4"], "strategy"),
        (["strategy=deepspeed_zero2", "strategy.zero_stage=4"], "zero_stage"),
        (["trainer.num_workers=64"], "num_workers"),
        (["trainer.compile=everything"], "trainer.compile"),
        (["strategy=deepspeed_zero1", "trainer.compile=blocks"], "deepspeed"),
    ],
)
def test_bad_training_config_fails_before_workers(ray_cluster, sim_data_root, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg = _cfg(sim_data_root, tmp_path, "bad", *overrides, "trainer.max_steps=1")
        run_training(cfg, "ae")
    assert not (tmp_path / "train_ae" / "bad" / "export").exists()


def test_exact_resume_single_process(sim_data_root, tmp_path):
    common = ("strategy=single", "trainer.num_workers=1", "data.deterministic=true")
    _, full = run_training(_cfg(sim_data_root, tmp_path, "full1", *common, "trainer.max_steps=4"), "ae")
    run_training(_cfg(sim_data_root, tmp_path, "split1", *common, "trainer.max_steps=4", "trainer.stop_at_step=2"), "ae")
    _, split = run_training(_cfg(sim_data_root, tmp_path, "split1", *common, "trainer.max_steps=4"), "ae")
    a, b = _export_state(full), _export_state(split)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, f"2N steps != N + resume + N (max abs diff {worst})"


@pytest.mark.slow
def test_compiled_blocks_in_bf16_train_and_export_plain_weights(sim_data_root, tmp_path):
    """trainer.compile=blocks + bf16: compiled in place, so checkpoints and exports keep the eager key names."""
    from cadiff.models.registry import build_model

    cfg = _cfg(sim_data_root, tmp_path, "compiled", "strategy=single", "trainer.num_workers=1", "trainer.max_steps=2",
               "trainer.compile=blocks", "trainer.precision=bf16")
    _, path = run_training(cfg, "ae")
    rows = _metrics(Path(path))
    assert rows[-1]["step"] == 2 and all(torch.isfinite(torch.tensor([r["loss"] for r in rows if "loss" in r])))
    state, model_cfg, _ = load_export(Path(path) / "export" / "model.pt")
    assert not any("_orig_mod" in k for k in state)
    build_model(model_cfg).load_state_dict(state)  # strict: the eager model takes the compiled run's weights
