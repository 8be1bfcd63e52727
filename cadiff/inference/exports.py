"""Find and load the model exports that training runs write (``<run>/export/model.pt``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cadiff.errors import CheckpointError


def resolve_export(path: str | Path, key: str) -> Path:
    """A run folder or an export file -> the export file; CheckpointError naming ``key`` when absent."""
    from cadiff.train.checkpoint import resolve_export as find_export

    try:
        return find_export(path).resolve()
    except CheckpointError:
        looked = [Path(path)] if Path(path).suffix == ".pt" else [Path(path) / "export" / "model.pt", Path(path) / "model.pt"]
        raise CheckpointError(
            f"{key}='{path}': no model export found (looked for {', '.join(str(c) for c in looked)}); "
            "expected a finished training run folder or its export/model.pt"
        ) from None


def load_exported_model(path: str | Path, key: str, expected_stage: str) -> tuple[nn.Module, dict[str, Any], Path]:
    """Build the model recorded in an export and load its EMA weights; returns (model, meta, export path)."""
    from cadiff.models.registry import build_model
    from cadiff.train.checkpoint import load_export

    export = resolve_export(path, key)
    state, model_cfg, meta = load_export(export)
    stage = meta.get("stage")
    if stage != expected_stage:
        raise CheckpointError(f"{key}='{path}': export {export} is from stage '{stage}', expected stage '{expected_stage}'")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{key}='{path}': weights in {export} do not match its model config: {exc}") from None
    return model.eval(), meta, export
