"""The single place configs become modules: ``build_model(cfg.model)`` and ``build_objective(cfg.diffusion)``.

A ``model`` config (DictConfig or plain dict with the keys of :class:`cadiff.config.AutoencoderConfig` or
:class:`cadiff.config.DiTConfig`) is merged into its schema (missing keys get defaults, unknown keys raise
ConfigError), validated, and stored on the built module as ``model.model_config`` (a plain dict) so an export
can rebuild the exact architecture.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from cadiff.config import (
    AutoencoderConfig,
    DiffusionConfig,
    DiTConfig,
    dec_num_res_blocks_of,
    dit_size,
    mean_head_of,
    to_dict,
    to_structured,
    validate_autoencoder,
    validate_diffusion,
    validate_dit,
)
from cadiff.diffusion.ddpm import DDPM
from cadiff.diffusion.flow import FlowMatching
from cadiff.diffusion.samplers import Objective
from cadiff.errors import ConfigError
from cadiff.models.autoencoder import DiffusionAutoencoder, RegressionAutoencoder
from cadiff.models.dit import LatentDiffusion

AUTOENCODER_KINDS = ("diffae", "regression")


def _plain(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, dict):
        return dict(cfg)
    raise ConfigError(f"model config of type {type(cfg).__name__}: expected a DictConfig or a dict")


def resolve_model_config(model_cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Full, validated plain dict of a ``model`` config (defaults filled from the schema of its ``kind``)."""
    raw = _plain(model_cfg)
    kind = raw.get("kind", "diffae")
    if kind in AUTOENCODER_KINDS:
        cfg = to_structured(raw, AutoencoderConfig)
        validate_autoencoder(cfg)
        # the head's network and the decoders' depth written out (null = the default), so an export names the
        # networks it holds
        return {**to_dict(cfg), "mean_head": mean_head_of(cfg), "dec_num_res_blocks": dec_num_res_blocks_of(cfg)}
    elif kind == "dit":
        cfg = to_structured(raw, DiTConfig)
        validate_dit(cfg)
    else:
        raise ConfigError(f"config key 'model.kind' = {kind!r}: expected one of {[*AUTOENCODER_KINDS, 'dit']}")
    return to_dict(cfg)


def build_objective(diffusion_cfg: DictConfig | dict[str, Any]) -> Objective:
    """``FlowMatching`` or ``DDPM`` from a ``diffusion`` config (:class:`cadiff.config.DiffusionConfig`)."""
    cfg = to_structured(_plain(diffusion_cfg), DiffusionConfig)
    validate_diffusion(cfg, "model.diffusion")
    if cfg.objective == "flow":
        return FlowMatching.from_config(cfg)
    return DDPM.from_config(cfg)


def build_model(model_cfg: DictConfig | dict[str, Any]) -> nn.Module:
    """``diffae`` -> DiffusionAutoencoder, ``regression`` -> RegressionAutoencoder, ``dit`` -> LatentDiffusion."""
    cfg = resolve_model_config(model_cfg)
    kind = cfg["kind"]
    if kind == "diffae":
        return DiffusionAutoencoder(cfg, build_objective(cfg["diffusion"]))
    if kind == "regression":
        return RegressionAutoencoder(cfg)
    return LatentDiffusion(cfg, build_objective(cfg["diffusion"]), dit_size(cfg))
