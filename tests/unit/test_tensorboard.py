"""logger=tensorboard: metrics.jsonl mirrored to TensorBoard event files on rank 0, resumes, config checks."""

from __future__ import annotations

import os

import pytest

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.train.logging import MetricsWriter, start_tensorboard


def test_logger_option_composes_and_a_misspelling_fails():
    assert compose("train_ae", ["logger=tensorboard"]).logger.name == "tensorboard"
    with pytest.raises(ConfigError, match="logger.name"):
        compose("train_ae", ["logger.name=tensorbored"])
    with pytest.raises(ConfigError, match="logger"):
        compose("train_latent", ["logger=nope"])


def test_missing_tensorboard_package_fails_at_compose(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger.name.*pip install tensorboard"):
        compose("train_ae", ["logger=tensorboard"])
    assert compose("train_ae", ["logger=tensorboard", "logger.mode=disabled"]).logger.mode == "disabled"


def test_tensorboard_mirrors_metrics_and_resumes_past_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose("train_ae", ["logger=tensorboard"]).logger
    config = {"trainer": {"lr": 0.001}, "logger": {"name": "tensorboard", "wandb_api_key": "secret-key"}}
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=start_tensorboard(cfg, tmp_path, config))
    for step in (5, 10, 15):
        writer.write({"step": step, "loss": 1.0 / step, "lr": 0.001, "note": "text is not a scalar"})
    writer.close()
    # a session resumed from the step-10 checkpoint logs step 15 again: the first session's step 15 is purged
    resumed = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=start_tensorboard(cfg, tmp_path, config, step=10))
    resumed.write({"step": 15, "loss": 0.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(5, 0.2), (10, 0.1), (15, 0.5)]
    text = " ".join(str(e.tensor_proto.string_val) for e in events.Tensors("config/text_summary"))
    assert "lr: 0.001" in text and "secret-key" not in text
    assert start_tensorboard(compose("train_ae", ["logger=tensorboard", "logger.mode=disabled"]).logger, tmp_path, {}) is None
    assert start_tensorboard(compose("train_ae", []).logger, tmp_path, {}) is None
    assert not os.path.exists(tmp_path / "wandb")
