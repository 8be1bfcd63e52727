"""GPU code paths checked on a CPU machine: device choice, per-device RNG state, CUDA determinism flags, MFU
peaks by GPU name and precision, noise drawn on the generator's device, Ray Train V2 for every driver."""

from __future__ import annotations

import logging
import os
import sys
import types

import pytest
import torch

from cadiff.diffusion.samplers import draw_rand, draw_randn
from cadiff.errors import ConfigError
from cadiff.runtime import ray as cadiff_ray
from cadiff.train import loop
from cadiff.train.logging import gpu_peak_flops, peak_flops_for


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L4", "fp32", 30.3e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("Tesla T4", "bf16", 8.1e12),
    ("NVIDIA A10", "fp32", 31.2e12),
    ("NVIDIA A100X", "bf16", None),  # no whole-word match: measured instead
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_gpu_peak_matches_whole_model_names_at_the_run_precision(name, precision, peak):
    assert gpu_peak_flops(name, precision) == peak


def test_peak_flops_for_cuda_uses_the_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    cuda = torch.device("cuda", 0)
    assert peak_flops_for(cuda, None, "fp32") == 91.6e12
    assert peak_flops_for(cuda, None, "bf16") == 362e12
    assert peak_flops_for(cuda, 5e12, "bf16") == 5e12


def test_worker_device_comes_from_ray_train_under_ray(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake = types.ModuleType("ray.train.torch")
    fake.get_device = lambda: torch.device("cuda", 3)  # e.g. a fractional GPU or a per-worker visible device
    import ray.train

    monkeypatch.setitem(sys.modules, "ray.train.torch", fake)
    monkeypatch.setattr(ray.train, "torch", fake, raising=False)
    assert loop.worker_device(use_ray=True, gpus_per_worker=0.5) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert loop.worker_device(use_ray=False, gpus_per_worker=1) == torch.device("cuda", 1)
    assert loop.worker_device(use_ray=True, gpus_per_worker=0) == torch.device("cpu")


def test_worker_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.worker_device(use_ray=True, gpus_per_worker=1) == torch.device("cpu")


def test_rng_state_touches_only_the_workers_device(monkeypatch):
    seen = []

    def everywhere():
        raise AssertionError("get_rng_state_all creates a context on every visible GPU")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", everywhere)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: everywhere())
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: seen.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: seen.append(("set", device)))
    cuda = torch.device("cuda", 2)
    state = loop.rng_state(cuda)
    loop.set_rng_state(state, cuda)
    assert seen == [("get", cuda), ("set", cuda)]
    # an older checkpoint's list of every GPU's state: this worker takes its own device's entry
    seen.clear()
    loop.set_rng_state({**state, "cuda": [torch.zeros(4)] * 3}, cuda)
    assert seen == [("set", cuda)]
    assert "cuda" not in loop.rng_state(torch.device("cpu"))


def test_deterministic_cuda_sets_the_flags_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda flag: calls.append(flag))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    loop.use_deterministic_cuda(torch.device("cpu"), True)
    loop.use_deterministic_cuda(torch.device("cuda", 0), False)
    assert calls == [] and torch.backends.cudnn.benchmark
    loop.use_deterministic_cuda(torch.device("cuda", 0), True)
    assert calls == [True]
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_noise_is_drawn_on_the_generators_device_then_moved(monkeypatch):
    draws = []
    real_randn, real_rand = torch.randn, torch.rand

    def randn(shape, generator=None, device=None, dtype=None):
        draws.append(("randn", device))
        return real_randn(shape, generator=generator, dtype=dtype)

    def rand(shape, generator=None, device=None):
        draws.append(("rand", device))
        return real_rand(shape, generator=generator)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch, "rand", rand)
    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(a[0]) or self)
    cpu_gen = torch.Generator().manual_seed(0)
    draw_randn((2, 3), cpu_gen, "cuda:0", torch.float32)
    draw_rand((2,), cpu_gen, "cuda:0")
    assert draws == [("randn", cpu_gen.device), ("rand", cpu_gen.device)]
    assert moved == ["cuda:0", "cuda:0"]
    draws.clear()
    draw_randn((2,), None, "cuda:0")  # no generator: straight on the target device
    assert draws == [("randn", "cuda:0")]


def test_same_stream_as_a_plain_cpu_draw():
    a = draw_randn((5,), torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(a, torch.randn(5, generator=torch.Generator().manual_seed(3)))


def test_media_failure_is_logged_with_its_reason(monkeypatch, caplog, tmp_path):
    class Stage:
        def log_media(self, *args):
            raise RuntimeError("Expected a 'cuda' device type for generator")

    run = types.SimpleNamespace(rank=0, model_config={}, stage=Stage(), run_dir=tmp_path, data=None,
                                cfg=types.SimpleNamespace(logger=None))
    monkeypatch.setattr(loop, "_plain_ema_model", lambda *a: torch.nn.Linear(1, 1))
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        loop._log_media(run, None, None, torch.zeros(1), 7, None)
    assert "media logging failed at step 7" in caplog.text
    assert "RuntimeError: Expected a 'cuda' device type for generator" in caplog.text


def test_every_driver_selects_ray_train_v2(monkeypatch):
    import ray

    inits = []
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw))
    monkeypatch.setattr(cadiff_ray, "_configure_ray_data", lambda progress: None)
    monkeypatch.setattr(cadiff_ray, "_sigterm_as_sigint", lambda: None)
    cfg = types.SimpleNamespace(address="ray://cluster:10001", log_level="WARNING")
    cadiff_ray.init_ray(cfg)  # joining an existing cluster, not one cadiff starts
    assert os.environ["RAY_TRAIN_V2_ENABLED"] == "1"
    assert inits[0]["runtime_env"]["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert cadiff_ray.local_env_vars("WARNING", True)["RAY_TRAIN_V2_ENABLED"] == "1"


def test_ray_train_v1_already_imported_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.train", types.ModuleType("ray.train"))
    monkeypatch.delitem(sys.modules, "ray.train.v2.api.config", raising=False)
    with pytest.raises(ConfigError, match="RAY_TRAIN_V2_ENABLED=1"):
        cadiff_ray.require_train_v2()
