"""Model exports: one file per training run for inference and stage 2, and safe loading of torch files.

An export is ONE file: ``{"format": "cadiff-export", "version", "state_dict", "model_config", "meta"}`` holding
only tensors and plain Python types, loadable with ``torch.load(weights_only=True)`` and without DeepSpeed/FSDP.
Inference, training and sweeps all read exports through this module (inference never imports ``cadiff.train``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cadiff.errors import CheckpointError
from cadiff.io import atomic_path

log = logging.getLogger(__name__)

EXPORT_FORMAT = "cadiff-export"
# 2: stage-1 DiffAE with a mean head and a per-pixel noise model (decoder_form=mean_flow); version-1 stage-1
# exports were decoders whose reconstructions ignored the latent, so they are refused rather than converted
EXPORT_VERSION = 2


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a missing or unsafe/corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"'{path}' cannot be loaded with torch.load(weights_only=True): {detail}; expected a file of "
            "tensors and plain Python types written by cadiff"
        ) from None



def _plain(obj: Any, where: str) -> Any:
    """A copy of ``obj`` built from dict/list/str/int/float/bool/None only (tuples become lists)."""
    with contextlib.suppress(ImportError):
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(list(obj))]
    raise CheckpointError(f"export field '{where}' has type {type(obj).__name__}: expected plain dict/list/str/number/bool/None")


def export_model(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], model_config: Mapping, meta: Mapping | None = None
) -> Path:
    """Atomically write EMA weights + model config + meta as one ``torch.load(weights_only=True)`` file."""
    path = Path(path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"export '{path}': state entries {bad[:3]} are not tensors; expected a state_dict")
    payload = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
        "model_config": _plain(dict(model_config), "model_config"),
        "meta": _plain(dict(meta or {}), "meta"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    log.info("exported %d tensors to %s", len(payload["state_dict"]), path)
    return path


def resolve_export(path: str | os.PathLike) -> Path:
    """The export file for ``path``: the file itself, or ``<run>/export/model.pt`` / ``<dir>/model.pt`` for a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "export" / "model.pt", path / "model.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"folder '{path}' holds no export: expected export/model.pt (a finished training run) or model.pt")
    raise CheckpointError(f"export '{path}' does not exist; expected a model.pt written by a training run (or its run folder)")


def _config_diff(stored: Mapping, expected: Mapping) -> list[str]:
    missing = object()
    diffs = []
    for key, want in expected.items():
        have = stored.get(key, missing)
        if have is missing:
            diffs.append(f"{key}: missing in export, expected {want!r}")
        elif have != want:
            diffs.append(f"{key}: export has {have!r}, expected {want!r}")
    return diffs


def load_export(path: str | os.PathLike, expected_config: Mapping | None = None) -> tuple[dict, dict, dict]:
    """Read an export -> ``(state_dict, model_config, meta)``; every key of ``expected_config`` must match."""
    file = resolve_export(path)
    obj = safe_load(file)
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"'{file}' is not a cadiff export (no format='{EXPORT_FORMAT}' record); expected a file written by export_model")
    if obj.get("version") != EXPORT_VERSION:
        hint = (" (written before the stage-1 decoder gained its mean head: retrain the train_ae run, then "
                "encode_latents and train_latent on top of it)" if obj.get("version") == 1 else "")
        raise CheckpointError(f"export '{file}' has version {obj.get('version')!r}; this cadiff reads version "
                              f"{EXPORT_VERSION}{hint}")
    model_config = obj["model_config"]
    if model_config.get("kind") in ("diffae", "regression") and "mean_head" not in model_config:
        # written before model.mean_head existed (ed3f43e), when the UNet on a blank input was the only head
        model_config = {**model_config, "mean_head": "unet"}
    if expected_config is not None:
        diffs = _config_diff(model_config, _plain(dict(expected_config), "expected_config"))
        if diffs:
            raise CheckpointError(f"export '{file}' is from another model config: {'; '.join(diffs[:5])}")
    return obj["state_dict"], model_config, obj["meta"]


def resolve_job_export(path: str | Path, key: str) -> Path:
    """A run folder or an export file -> the export file; CheckpointError naming ``key`` when absent."""
    try:
        return resolve_export(path).resolve()
    except CheckpointError:
        looked = [Path(path)] if Path(path).suffix == ".pt" else [Path(path) / "export" / "model.pt", Path(path) / "model.pt"]
        raise CheckpointError(
            f"{key}='{path}': no model export found (looked for {', '.join(str(c) for c in looked)}); "
            "expected a finished training run folder or its export/model.pt"
        ) from None


def load_exported_model(path: str | Path, key: str, expected_stage: str) -> tuple[nn.Module, dict[str, Any], Path]:
    """Build the model recorded in an export and load its EMA weights; returns (model, meta, export path).

    Loaded models are cached per export file (path, modification time and size), so samplers and previews that
    decode batch after batch load each export once: callers share the instance and must not change its weights.
    """
    export = resolve_job_export(path, key)
    stat = export.stat()
    model, meta = _load_model(str(export), stat.st_mtime_ns, stat.st_size, key, expected_stage)
    return model, meta, export


@functools.lru_cache(maxsize=4)
def _load_model(export: str, _mtime_ns: int, _size: int, key: str, expected_stage: str) -> tuple[nn.Module, dict]:
    from cadiff.models.registry import build_model

    state, model_cfg, meta = load_export(export)
    stage = meta.get("stage")
    if stage != expected_stage:
        raise CheckpointError(f"{key}='{export}': export is from stage '{stage}', expected stage '{expected_stage}'")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{key}='{export}': weights do not match its model config: {exc}") from None
    return model.eval(), meta
