"""The two training stages as objects: what differs between stage 1 (clips) and stage 2 (latents).

A :class:`Stage` knows its job name, config schema and data section, checks its data against the config
(:meth:`Stage.resolve`, on the driver, before any worker starts), derives the model values that come from
the data (the stage-1 pixel noise model, the stage-2 input channels) and returns them as a frozen
:class:`DataInfo` plus a resolved model config - the job config itself is never written to. It also builds
the Ray Data training set and writes the training previews. The loop and the launcher hold a Stage and
call it; no ``stage == "ae"`` switch elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cadiff import storage
from cadiff.config import (
    DataConfig,
    TrainAEConfig,
    TrainLatentConfig,
    compose,
    to_dict,
    validate_clip_for_model,
)
from cadiff.data import pipeline
from cadiff.data.prepare import prepare_data
from cadiff.data.shards import read_index
from cadiff.errors import CheckpointError, ConfigError, DataError
from cadiff.eval.score import reconstruction_score, sample_mmd2
from cadiff.models.autoencoder import MIN_NOISE_STD, resolved_decoder_form
from cadiff.models.registry import resolve_model_config
from cadiff.runtime.exports import load_export
from cadiff.train.media import log_stage1, log_stage2, to_preview_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataInfo:
    """What a training run knows about its data, resolved once on the driver (JSON-safe via ``to_dict``)."""

    root: str
    sample_shape: tuple[int, ...]
    num_train_clips: int
    normalization: dict[str, Any] | None = None  # clips: the shards' normalization; latents: the stage-1 data's
    sources: dict[str, Any] | None = None  # clips: per-source calibration (gain, offset, read_noise)
    channel_mean: tuple[float, ...] | None = None  # latents: per-channel normalization
    channel_std: tuple[float, ...] | None = None
    stage1: str | None = None  # latents: the stage-1 export they were encoded with
    # latents: the train clips' median photon flux (encode_latents), the brightness a mask sample is guided at
    flux_median: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("sample_shape", "channel_mean", "channel_std"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataInfo:
        data = dict(data)
        for key in ("sample_shape", "channel_mean", "channel_std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def preview_calibration(self) -> dict[str, Any]:
        """Calibration used to show previews in photon units: the first source of the training data."""
        if not self.sources:
            raise DataError(f"data root '{self.root}': no source calibration recorded in index.json")
        return next(iter(self.sources.values()))


class Stage:
    """Stage-specific parts of a training run; see :data:`STAGES`."""

    name: ClassVar[str]
    job: ClassVar[str]
    data_key: ClassVar[str]  # the config section of the stage's data: data | latents
    kind: ClassVar[str]  # shard kind: clips | latents
    schema: ClassVar[type]
    probes_latent_use: ClassVar[bool] = False  # validation also logs the stage-1 latent-use telemetry

    def data_cfg(self, cfg: Any) -> Any:
        return getattr(cfg, self.data_key)

    def resolve(self, cfg: Any) -> tuple[DataInfo, dict[str, Any]]:
        """Check the data against ``cfg``; return the DataInfo and the resolved model config (cfg untouched)."""
        raise NotImplementedError

    def train_dataset(self, cfg: Any) -> Any:
        """The Ray Data training set of this stage."""
        raise NotImplementedError

    def log_media(self, model: torch.nn.Module, val_x: torch.Tensor, info: DataInfo, media_dir: Path, step: int,
                  logger_cfg: Any, wandb_run: Any = None) -> list[Path]:
        raise NotImplementedError

    def quality_score(self, model: torch.nn.Module, val_x: torch.Tensor, info: DataInfo) -> dict[str, float]:
        """The run's quality ``score`` on the val batch, comparable across trials (see cadiff.eval.score)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Stage({self.name!r})"


def _read_index(root: str, key: str, kind: str, hint: str) -> dict[str, Any]:
    if not storage.is_file(storage.join(root, "index.json")):
        raise DataError(f"{key} '{root}': no index.json; {hint}")
    index = read_index(root)
    if index.get("kind", "clips") != kind:
        raise DataError(f"{key} '{root}': index.json kind is '{index.get('kind')}', expected '{kind}'")
    return index


class ClipStage(Stage):
    """Stage 1: a diffusion (or regression) autoencoder on normalized clip shards."""

    name, job, data_key, kind, schema = "ae", "train_ae", "data", "clips", TrainAEConfig
    probes_latent_use = True

    def resolve(self, cfg: Any) -> tuple[DataInfo, dict[str, Any]]:
        root = str(cfg.data.root)
        auto = cfg.data.prepare_if_missing
        if auto is None:
            auto = not storage.is_uri(root) and Path(root).resolve() == Path(DataConfig.root).resolve()
        if not storage.is_file(storage.join(root, "index.json")) and auto:
            _prepare_default_sim(root)
        index = _read_index(root, "data.root", "clips", f"run jobs/prepare_data.py out={root} first (or set "
                            "data.prepare_if_missing=true to simulate data there)")
        t, h, w = index["clip_shape"]
        d = cfg.data
        frames, height, width = d.crop_frames or t, d.crop_height or h, d.crop_width or w
        if frames > t or height > h or width > w:
            raise ConfigError(f"data.crop_* = {(frames, height, width)} exceeds the stored clip shape {(t, h, w)} in "
                              f"{root}/index.json; set data.crop_frames/crop_height/crop_width to at most {(t, h, w)} "
                              "(a valid shape for the model), or prepare larger clips (prepare_data clip.*)")
        validate_clip_for_model(frames, height, width, cfg.model, "data.crop" if d.crop_frames else f"{root}/index.json clip")
        if not index["splits"].get("train", {}).get("num_clips"):
            raise DataError(f"data.root '{root}': split 'train' has no clips; prepare more data or lower val_fraction")
        if not index["splits"].get("val", {}).get("num_clips"):
            # one short recording has no frames to spare for a time split (prepare_data warned): train anyway
            log.warning("data.root '%s' has no validation clips: validation losses, media and scores use the first "
                        "training clips (in-sample); prepare more or longer recordings for a held-out split", root)
        model = to_dict(cfg.model)
        model.update(derived_noise(model, index["normalization"], root, index["sources"]))
        info = DataInfo(root=storage.resolved(root), sample_shape=(1, frames, height, width),
                        num_train_clips=int(index["splits"]["train"]["num_clips"]),
                        normalization=dict(index["normalization"]), sources=dict(index["sources"]))
        return info, resolve_model_config(model)

    def train_dataset(self, cfg: Any) -> Any:
        return pipeline.clip_dataset(cfg.data.root, "train", cfg.data, seed=cfg.seed)

    def log_media(self, model, val_x, info, media_dir, step, logger_cfg, wandb_run=None) -> list[Path]:
        return log_stage1(model, val_x[:2], info.normalization, info.preview_calibration(), media_dir, step, logger_cfg,
                          wandb_run)

    def quality_score(self, model, val_x, info) -> dict[str, float]:
        latent_use = float(model.validation_losses(val_x)["latent_use"])
        calib = info.preview_calibration()
        inputs, recon = (to_preview_units(x, info.normalization, calib) for x in (val_x, model.reconstruct(val_x)))
        return reconstruction_score(inputs, recon, latent_use)


class LatentStage(Stage):
    """Stage 2: the DiT objective on per-channel-normalized latents of a stage-1 encoder."""

    name, job, data_key, kind, schema = "latent", "train_latent", "latents", "latents", TrainLatentConfig

    def resolve(self, cfg: Any) -> tuple[DataInfo, dict[str, Any]]:
        root = str(cfg.latents.root)
        index = _read_index(root, "latents.root", "latents", f"run jobs/encode_latents.py out={root} first")
        stage1 = index.get("stage1")
        if not stage1 or not Path(stage1).exists():
            raise CheckpointError(
                f"latents.root '{root}': stage-1 export '{stage1}' recorded in index.json does not exist; expected the "
                "train_ae export these latents were encoded with (re-run jobs/encode_latents.py with an existing stage1)"
            )
        _state, stage1_cfg, _meta = load_export(stage1)
        channels = int(index["latent_shape"][0])
        if int(stage1_cfg.get("z_channels", channels)) != channels:
            raise DataError(
                f"latents.root '{root}': latent_shape has {channels} channels but stage-1 export {stage1} has "
                f"z_channels={stage1_cfg.get('z_channels')} (latents from another encoder?)"
            )
        if cfg.model.in_channels not in (None, channels):
            raise ConfigError(f"model.in_channels = {cfg.model.in_channels}: expected {channels} (the latent channels in {root})")
        conditions = check_conditions(cfg.model, index, root)
        subgrid = check_mask_subgrid(cfg, int(stage1_cfg.get("spatial_downsample", 1)), conditions)
        info = DataInfo(root=storage.resolved(root), sample_shape=tuple(index["latent_shape"]),
                        num_train_clips=int(index["splits"]["train"]["num_clips"]),
                        normalization=index.get("normalization"), channel_mean=tuple(index["channel_mean"]),
                        channel_std=tuple(index["channel_std"]), stage1=str(Path(stage1).resolve()),
                        flux_median=index.get("flux_median"))
        return info, resolve_model_config({**to_dict(cfg.model), "in_channels": channels, "conditions": conditions,
                                           "mask_subgrid": subgrid})

    def train_dataset(self, cfg: Any) -> Any:
        return pipeline.latent_dataset(cfg.latents.root, "train", cfg.latents, seed=cfg.seed)

    # val_x holds the latent channels and then any condition channels: media and scores use the latents, sampled
    # unconditionally
    def log_media(self, model, val_x, info, media_dir, step, logger_cfg, wandb_run=None) -> list[Path]:
        return log_stage2(model, tuple(info.sample_shape), pipeline.latent_stats(info.to_dict()), info.stage1,
                          media_dir, step, logger_cfg, wandb_run)

    def quality_score(self, model, val_x, info) -> dict[str, float]:
        latents = val_x[:, : info.sample_shape[0]]
        samples = model.sample(tuple(latents.shape))
        return sample_mmd2(samples.float().cpu().numpy(), latents.float().cpu().numpy())


def check_conditions(model_cfg: Any, index: dict[str, Any], root: Path) -> list[str]:
    """The condition channels of the latents at ``root``; ConfigError if the model asks for one they lack."""
    available = list(index.get("conditioning", []))
    for key, name, hint in (("cond_mask", "roi_mask", "prepare_data from a source with ROIs (sim, neurofinder, nwb "
                             "with a plane segmentation), then encode_latents"),
                            ("cond_flux", "flux", "data with a photon calibration (not source.calibration=none), "
                             "encoded by this version of encode_latents")):
        if model_cfg[key] and name not in available:
            raise ConfigError(f"config key 'model.{key}' = true: latents.root '{root}' carries no '{name}' condition "
                              f"(index.json conditioning: {available}); expected latents from {hint} (data and latents "
                              "written before conditioning existed carry none: re-run both with overwrite=true)")
    return available


def check_mask_subgrid(cfg: Any, block: int, conditions: list[str]) -> int:
    """``latents.mask_subgrid``, the ROI map's planes per latent pixel side the DiT is built for: it must divide
    the stage-1 spatial downsample ``block`` when the latents carry an ROI map, and ``model.mask_subgrid``, if
    set, must agree with it."""
    subgrid = int(cfg.latents.mask_subgrid)
    if cfg.model.mask_subgrid not in (None, subgrid):
        raise ConfigError(f"model.mask_subgrid = {cfg.model.mask_subgrid}: expected null or latents.mask_subgrid "
                          f"({subgrid}), the ROI-map planes the latent pipeline builds")
    if "roi_mask" in conditions and block % subgrid:
        raise ConfigError(f"latents.mask_subgrid = {subgrid}: expected a divisor of the stage-1 spatial downsample "
                          f"{block} (each latent pixel covers {block}x{block} pixels)")
    return subgrid


STAGES: dict[str, Stage] = {stage.name: stage for stage in (ClipStage(), LatentStage())}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"stage '{name}': expected one of {sorted(STAGES)}")
    return STAGES[name]


# ---------------------------------------------------------------------------------------------------------
# values derived from the data


def derived_noise(model: dict[str, Any], norm: dict[str, Any], root: str | Path,
                  sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DiffAE's analytic noise term from the data index, per ``model.noise_skip`` (null = auto).

    Returns model-config entries to set (``{}`` when nothing is derived). ``mean_flow`` decoders get
    ``noise_model`` (normalization kind, center, scale and the read noise of the first source): a per-pixel
    noise level for Anscombe- or photon-normalized data. The ``flow`` form gets the homoscedastic
    ``noise_std = 1 / normalization.scale`` of Anscombe-normalized data. Raw-unit data (``source.calibration=none``)
    has no photon noise model: both forms get a homoscedastic ``noise_std`` (:func:`raw_noise_std`).
    """
    if model.get("kind", "diffae") != "diffae" or model["diffusion"]["objective"] != "flow":
        return {}  # explicit noise_skip/decoder_form with DDPM fails at compose time
    mean_flow = resolved_decoder_form(model) == "mean_flow"
    noise_skip, noise_std = model.get("noise_skip"), model.get("noise_std")
    if noise_skip is False:
        if mean_flow and noise_std is None and model["noise_model"]["kind"] == "none":
            raise ConfigError("model.noise_skip=false leaves the mean_flow decoder without a pixel noise level; "
                              "set model.noise_std=<std in normalized units> or model.decoder_form=flow")
        return {}
    if norm.get("kind") == "raw":
        return _raw_noise(model, norm, root, sources or {})
    if mean_flow:
        if norm.get("kind") not in ("anscombe", "photon"):
            raise ConfigError(f"{root}/index.json normalization.kind={norm.get('kind')!r}: the mean_flow decoder "
                              "needs 'anscombe' or 'photon'")
        return {"noise_model": {"kind": str(norm["kind"]), "center": float(norm["center"]), "scale": float(norm["scale"]),
                                "read_noise_photons": read_noise_photons(sources or {})}}
    if norm.get("kind") != "anscombe":
        if noise_skip is None:
            return {}
        raise ConfigError(f"model.noise_skip=true needs homoscedastic (Anscombe-normalized) data, but {root}/index.json "
                          f"has normalization.kind={norm.get('kind')!r}; prepare it with normalization.kind=anscombe "
                          "or set model.noise_std explicitly")
    std = 1.0 / float(norm["scale"])
    if noise_std is not None and abs(noise_std - std) > 1e-6 * std:
        raise ConfigError(f"model.noise_std={noise_std} contradicts model.noise_skip=true with "
                          f"{root}/index.json normalization.scale={norm['scale']} (noise std {std:.6g})")
    return {"noise_std": std}


def _raw_noise(model: dict[str, Any], norm: dict[str, Any], root: str | Path, sources: dict[str, Any]) -> dict[str, Any]:
    """Raw-unit data: no photon noise model (no gain), so a homoscedastic ``noise_std`` unless one is set."""
    if model.get("noise_draw") == "poisson":
        raise ConfigError(f"model.noise_draw='poisson' draws photon counts, but {root}/index.json is in raw units "
                          "(source.calibration=none: no gain); use model.noise_draw=auto or gaussian")
    if model.get("mean_target") == "photon_split":
        raise ConfigError(f"model.mean_target='photon_split' thins photon counts, but {root}/index.json is in raw "
                          "units (source.calibration=none: no gain); use model.mean_target=input")
    if model.get("noise_std") is not None:
        return {}
    std = raw_noise_std(sources, norm, root)
    log.info("%s is in raw units (source.calibration=none): the photon noise model is not applicable (no gain); the "
             "decoder uses homoscedastic Gaussian pixel noise of std %.4g (normalized units), measured from frame "
             "differences when the data was prepared", root, std)
    return {"noise_std": std}


def raw_noise_std(sources: dict[str, Any], norm: dict[str, Any], root: str | Path) -> float:
    """Pixel noise std in normalized units of raw-unit data: the median over sources of the temporal noise measured
    at prepare time (``raw.noise_std``, Donoho-Johnstone MAD of frame differences) over ``raw.scale * norm.scale``,
    floored at the decoder's minimum noise level."""
    values = {sid: c["raw"]["noise_std"] / c["raw"]["scale"] / float(norm["scale"])
              for sid, c in sources.items() if c.get("raw", {}).get("noise_std") is not None}
    if not values:
        raise ConfigError(f"{root}/index.json: raw-unit data without a measured noise level (single-frame movies); "
                          "set model.noise_std=<pixel noise std in normalized units>")
    if max(values.values()) > 1.1 * min(values.values()):
        log.warning("sources differ in pixel noise (%s, normalized units): the decoder uses their median", values)
    return max(float(np.median(list(values.values()))), MIN_NOISE_STD)


def read_noise_photons(sources: dict[str, Any]) -> float:
    """Read noise in photons of the first source (sorted id), the calibration sampling also converts with."""
    if not sources:
        return 0.0
    values = {sid: float(c.get("read_noise") or 0.0) / float(c["gain"]) for sid, c in sources.items()}
    if len(set(round(v, 6) for v in values.values())) > 1:
        log.warning("sources differ in read noise (%s photons): the decoder's noise model uses %s's",
                    values, sorted(values)[0])
    return float(values[sorted(values)[0]])


def _prepare_default_sim(root: str) -> None:
    log.info("data.root %s has no index.json: preparing simulated data there (source=sim)", root)
    prepare_data(compose("prepare_data", [f"out={root}"]))

