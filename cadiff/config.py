"""Structured-config schemas (dataclasses) for every job, Hydra composition and validation.

Configs are composed from the YAML files packaged in ``cadiff/conf`` with Hydra's compose API, then merged
into the job's dataclass schema: an unknown key or a wrong type fails here, naming the key, before any Ray
worker starts. ``validate_*`` functions add the rules a type system cannot express (shape rules, options).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cadiff.data.conditioning import CONDITIONS, MASK_SUFFIXES, flux_value
from cadiff.diffusion.ddpm import DDPM
from cadiff.diffusion.flow import FlowMatching
from cadiff.diffusion.samplers import GRID_FORMS, parse_grid
from cadiff.errors import ConfigError
from cadiff.runinfo import SECRET_MARKERS
from cadiff.runtime.memory import MMAP_THRESHOLD_MAX_KB

CONF_MODULE = "cadiff.conf"

# ---------------------------------------------------------------------------------------------------------
# data preparation


CALIBRATIONS = ("auto", "photon_transfer", "dark", "none")  # source.calibration, cadiff.data.prepare.calibrate
JUDGES = ("none", "suite2p")  # evaluate judge=, cadiff/eval/suite2p_judge.py


@dataclass
class SourceConfig:
    """Where movies come from: the simulator, local TIFF/HDF5/NWB files, or a public archive."""

    name: str = "sim"  # sim | tiff | hdf5 | nwb | neurofinder | allen
    path: Optional[str] = None  # tiff/hdf5/nwb: a file or a folder (nwb: also an http(s) URL, e.g. a DANDI asset)
    key: str = "data"  # hdf5 dataset key
    series: Optional[str] = None  # nwb: the TwoPhotonSeries/OnePhotonSeries to read when the file has several
    ids: list[str] = field(default_factory=list)  # neurofinder dataset ids / allen experiment ids
    base_url: Optional[str] = None  # mirror of the public archive: https://, or http:// to 127.0.0.1 (tests)
    cache_dir: str = "outputs/downloads"  # downloads, their extraction and downloads.lock.json (sizes + sha256)
    zip_max_total_gib: float = 20.0  # refuse a zip archive that expands beyond this (Neurofinder: a few GiB)
    zip_max_ratio: float = 200.0  # refuse a zip archive that expands beyond this many times its size (TIFF: ~1-3x)
    rate_hz: Optional[float] = None  # override when the file carries no frame rate
    # calibration: auto = photon_transfer, else dark, else none (each fallback a WARNING naming the reason);
    # photon_transfer = the mean-variance line; dark = offset from the darkest pixels, gain from the slope through
    # it; none = no photon scale: robust z-scores in the movie's own units, gain-based metrics not applicable
    calibration: str = "auto"
    gain: Optional[float] = None  # ADU per photon; given with offset, it wins over any estimate (not with none)
    offset: Optional[float] = None  # ADU at zero photons
    read_noise: Optional[float] = None  # ADU; with gain/offset given (default 0: offset is the PT intercept)
    calibration_frames: int = 1024  # frames (in 8-frame windows spread over the movie) used to estimate gain
    # simulator
    preset: str = "default"  # default | two_photon
    num_movies: int = 4
    frames: int = 200
    height: int = 64
    width: int = 64
    num_neurons: Optional[int] = None
    seed: int = 0


@dataclass
class ClipConfig:
    """Clip tiling: every clip is [frames, height, width] of the source movie."""

    frames: int = 17
    height: int = 64
    width: int = 64
    stride_frames: Optional[int] = None  # default: frames (no overlap)
    stride_px: Optional[int] = None  # default: height/width (no overlap)


@dataclass
class NormalizationConfig:
    """x = (f(photons) - center) / scale with f = identity ("photon") or generalized Anscombe."""

    # anscombe (default): shot noise becomes ~N(0, 1) at every brightness, which the DiffAE's analytic noise term
    # (model.noise_skip) relies on; photon: plain photon counts
    kind: str = "anscombe"  # anscombe | photon
    scale: Optional[float] = None  # None: measured on the training clips at prepare time
    center: Optional[float] = None


@dataclass
class PrepareDataConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    out: str = "outputs/data/sim"
    val_fraction: float = 0.25  # fraction of recordings (never clips) held out
    clips_per_shard: int = 64
    seed: int = 0
    # replace an earlier prepare_data output in `out` made from other settings or input files: the new data is
    # built beside it and swapped in only when complete (any other non-empty folder is refused)
    overwrite: bool = False
    verbose: bool = False


# ---------------------------------------------------------------------------------------------------------
# training


@dataclass
class DataConfig:
    """Clip shards read by Ray Data (or a DataLoader) into training workers."""

    root: str = "outputs/data/sim"
    batch_size: int = 2  # per worker
    crop_frames: Optional[int] = None  # None: the stored clip size
    crop_height: Optional[int] = None
    crop_width: Optional[int] = None
    flip: bool = True
    deterministic: bool = False  # fixed per-rank shard assignment and seeded order (exact resume)
    corrupt_shards: str = "fail"  # fail | skip
    num_val_clips: int = 8
    prefetch_batches: int = 4  # Ray Data batches each worker keeps ready ahead of its training step
    # CPUs each Ray Data decode task reserves (Ray's default 1): a sweep trial also needs them beside its Train
    # workers, so on small nodes (or many trials per node) a fraction lets a whole trial fit one node
    cpus_per_task: float = 1.0
    # simulate data (prepare_data source=sim) into a data.root without index.json; null: only for the default
    # root outputs/data/sim (the unconfigured demo), so a mistyped path is an error, never a silent simulation
    prepare_if_missing: Optional[bool] = None


@dataclass
class LatentsConfig:
    root: str = "outputs/latents/default"
    batch_size: int = 4  # per worker
    deterministic: bool = False
    corrupt_shards: str = "fail"
    num_val_clips: int = 8
    prefetch_batches: int = 4
    cpus_per_task: float = 1.0  # as DataConfig.cpus_per_task
    # the ROI-map condition per latent pixel as mask_subgrid x mask_subgrid sub-block fractions (mask_subgrid^2
    # channels; cadiff.data.conditioning.mask_planes): a power of 2 dividing the stage-1 spatial downsample.
    # 1: one fraction per latent pixel. The DiT's model.mask_subgrid follows it.
    mask_subgrid: int = 1


@dataclass
class DiffusionConfig:
    """Generative objective: flow matching (t=0 data, t=1 noise, velocity eps - x0) or continuous DDPM."""

    objective: str = "flow"  # flow | ddpm
    time_sampler: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # resolution shift of t (SD3): t' = s t / (1 + (s - 1) t)
    loss_weighting: str = "none"  # none | min_snr
    ddpm_schedule: str = "cosine"  # linear | cosine
    ddpm_prediction: str = "v"  # eps | v
    sampler: str = "euler"  # euler | heun | midpoint (flow); ddim | ancestral (ddpm)
    num_steps: int = 20
    # sampling time grid (cadiff.diffusion.samplers.time_grid): uniform (then `shift`, as trained) | shift:S | rho:R
    grid: str = "uniform"


@dataclass
class NoiseModelConfig:
    """Pixel noise of the normalized data, for the stage-1 decoder's analytic noise term (from the data index)."""

    kind: str = "none"  # none (not set) | anscombe | photon: the shards' normalization.kind
    center: float = 0.0  # normalization.center
    scale: float = 1.0  # normalization.scale
    read_noise_photons: float = 0.0  # detector read noise of the (first) source, in photons


@dataclass
class AutoencoderConfig:
    """Stage 1: causal 3D conv encoder + causal 3D UNet flow decoder (diffae) or a regression decoder."""

    kind: str = "diffae"  # diffae | regression
    in_channels: int = 1
    z_channels: int = 8
    temporal_downsample: int = 4  # clip frames must be 1 + k * temporal_downsample
    spatial_downsample: int = 8
    # encoder: conv_in, then per level num_res_blocks residual blocks (where the width changes to base_channels *
    # channel_mult[i]) and a strided causal conv, then one mid block. The default, no blocks per level at a constant
    # width (only the strided convs and the mid block), with one block per upsampler level below, makes ae_default's
    # training step 58 instead of 143 GFLOP against one block per level with channel_mult [1, 2, 4, 4] and
    # dec_num_res_blocks=1 (the default until docs/design.md "Stage-1 size"), as good for about equal training
    # time. With num_res_blocks=0 channel_mult must be constant: no layer would change the width
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    num_res_blocks: int = 0
    latent_reg: str = "kl"  # kl | none
    kl_weight: float = 1e-6
    # decoder networks: the DiffAE's flow UNet (flow form, residual_unet) and the mean head, the regression decoder
    dec_base_channels: int = 32
    dec_channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    # residual blocks of the decoder networks: the UNet runs this many per level on the way down and one more on the
    # way up, the upsampler this plus one per level. null: 0 where the upsampler is the model's only decoder network
    # (the default mean_flow DiffAE, the regression AE), else 1; resolved by dec_num_res_blocks_of()
    dec_num_res_blocks: Optional[int] = None
    dec_attention: bool = False
    # the deterministic z -> clip decoder (the mean_flow mean head, the regression decoder): upsampler = a decoder
    # that only upsamples from the latent, its coarse levels at the latent frame rate (unet3d.LatentUpsampler);
    # unet = the decoder UNet on a blank input (down path, skips). null = upsampler (the default since the upsampler
    # matched the UNet head in stage-1 quality at equal training time and in generation over three seeds at 2.1-2.4x
    # less step cost: docs/design.md). Resolved by mean_head_of(); the flow form (decoder_form=flow) has no mean head
    mean_head: Optional[str] = None  # unet | upsampler | null
    # recompute norm/FiLM/SiLU and the causal pad in backward instead of storing them; conv outputs are kept, so no
    # conv FLOPs are redone (a residual block holds 2 activations from forward to backward instead of 8.5)
    recompute_elementwise: bool = True
    regression_loss: str = "l2"  # l2 | l1
    # diffae: mean_flow = a mean head mu(z) trained with L2 plus a flow around it whose Gaussian noise part is
    # analytic (the latent must carry the signal); flow = the UNet velocity alone (+ the noise_std term below)
    # null: mean_flow for the flow objective, flow for DDPM (the analytic terms are flow velocities)
    decoder_form: Optional[str] = None  # mean_flow | flow
    # mean_flow: a UNet for what is neither the mean nor Gaussian noise; off by default: at CPU budgets it only
    # added variance and cost structure (benchmarks/results/ae_quality_ablation.md)
    residual_unet: bool = False
    # mean_flow: how decoding draws the shot noise around mu. gaussian: the analytic Gaussian flow (photon mean and
    # variance exact); poisson: photon counts drawn from the calibrated Poisson-Gaussian model (exact at any level);
    # auto: poisson for photon-starved data (typical level < 1 photon/pixel/frame, where no Gaussian has the
    # counts' statistics), else gaussian
    noise_draw: str = "auto"
    mean_loss_weight: float = 1.0  # mean_flow: weight of the mean head's L2 loss
    # mean_flow: what the mean head learns. input: the clip itself (its latent then also carries block averages
    # of the clip's own shot noise); photon_split: the encoder sees a random share of the photons (split_fraction)
    # and the mean head learns the rest, whose noise the latent cannot know (Noise2Noise by binomial thinning)
    mean_target: str = "input"
    split_fraction: float = 0.8  # the encoder's share; 0.5 left the encoder's input too unlike a whole clip (+5% flux)
    # mean_flow: per-pixel noise level sigma(mu); the trainer fills it in from the data index (noise_skip rules)
    noise_model: NoiseModelConfig = field(default_factory=NoiseModelConfig)
    # diffae + flow: std of homoscedastic pixel noise in normalized units, transported by an analytic Gaussian
    # velocity term (autoencoder.DiffusionAutoencoder.velocity); None: off. The trainer fills it in from the
    # data index (1 / normalization.scale of Anscombe-normalized data) per noise_skip: null = when the data is
    # Anscombe-normalized, true = required (photon data is an error), false = never
    noise_std: Optional[float] = None
    noise_skip: Optional[bool] = None
    noise_highpass: bool = True  # the noise term acts on x_t minus its 3x3 spatial mean; the mean gets unit std
    # Heun: the first-order Euler error shrinks the sampled noise (benchmarks/results/ae_quality.md sampler table)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(sampler="heun"))


# DiT widths (Peebles & Xie 2023, arXiv:2212.09748): (hidden size, depth, heads): S/B/L/XL from DiT Table 1; tiny for tests and smoke runs
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclass
class DiTConfig:
    """Stage 2: DiT on latents. Width/depth/heads come from the size registry unless set here."""

    kind: str = "dit"
    in_channels: Optional[int] = None  # None: the latent channels recorded in the latent index
    size: str = "tiny"  # a key of DIT_SIZES: tiny | S | B | L | XL
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w)
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    cond_dim: int = 0
    cond_mask: bool = False  # condition on each clip's ROI map (sources with ROIs: sim, neurofinder, nwb)
    # ROI-map planes per latent pixel side (mask_subgrid^2 mask channels); None: latents.mask_subgrid
    mask_subgrid: Optional[int] = None
    cond_flux: bool = False  # condition on each clip's mean photon flux
    cond_dropout: float = 0.1  # per condition and sample: trained unconditionally this often (guidance needs it)
    conditions: Optional[list[str]] = None  # None: the condition channels recorded in the latent index
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


@dataclass
class StrategyConfig:
    """How the model is distributed across workers."""

    name: str = "ddp"  # one of STRATEGY_NAMES: single | ddp | deepspeed | fsdp2
    zero_stage: int = 0  # deepspeed only: 1, 2 or 3
    backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True  # fsdp2
    find_unused_parameters: bool = False  # ddp


@dataclass
class EMAConfig:
    decay: float = 0.999
    warmup_power: Optional[float] = None  # EDM-style: decay_n = min(decay, 1 - (1 + n)^-1 * ...) if set
    update_every: int = 1


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 autocast where the device multiplies bf16 in hardware)
    # torch.compile placement: none | blocks (each residual/transformer block, the shard units) | model (each
    # network whole); benchmarks/model_step.md measures both (blocks + bf16: 2.8x the eager fp32 DiffAE step)
    compile: str = "none"
    # torch.compile backend: inductor (generated kernels) | aot_eager (graph capture and autograd tracing without
    # code generation: debugging, and the test suite, where inductor's C++ builds cost minutes on 2 cores)
    compile_backend: str = "inductor"
    log_every: int = 10
    val_every: int = 100
    ckpt_every: int = 100
    media_every: int = 0  # 0: only at the end
    num_to_keep: int = 2
    max_failures: int = 0
    stop_at_step: Optional[int] = None  # end this session at that step (checkpoint + export); a re-run resumes
    # checkpoint this session starts from: null = the latest that passes its sha256 check and loads (a damaged
    # one is set aside as .corrupt_step_<n> and the previous one used); <n> = checkpoints/step_<n>; a path = that
    # checkpoint folder. An explicit choice must verify, and this run's newer checkpoints are set aside
    # (.superseded_step_<n>, kept) so training continues from it
    resume_from: Any = None
    threads_per_worker: Optional[int] = None  # torch threads; None: cpus_per_worker rounded up
    # glibc malloc: tensors of at least this many KiB are mmapped and unmapped when freed, so a worker's RSS does
    # not keep a fragmented heap's high-water mark (cadiff.runtime.memory: the measured trade-off of 16 MiB against
    # 1 MiB); null: leave malloc's defaults
    malloc_mmap_threshold_kb: Optional[int] = 16384
    peak_flops: Optional[float] = None  # FLOP/s for MFU; None: measured matmul FLOP/s (CPU) or table (GPU)
    # each validation also logs the stage's quality `score` on the val clips (cadiff.eval.score; sweeps set it)
    score: bool = False


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb | tensorboard (event files in <run>/tensorboard/)
    project: str = "cadiff"
    mode: str = "offline"  # offline | online | disabled
    video_fps: int = 10


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS, else a local cluster
    num_cpus: Optional[int] = None
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False
    # console level of Ray's own logs (ray, Ray Train, Ray Data); cadiff's progress lines are not affected
    log_level: str = "WARNING"


@dataclass
class _TrainJobConfig:
    """What both training stages share; each stage adds its data section and model."""

    run_name: Optional[str] = None
    out_root: str = "outputs"
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    verbose: bool = False


@dataclass
class TrainAEConfig(_TrainJobConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)


@dataclass
class TrainLatentConfig(_TrainJobConfig):
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    model: DiTConfig = field(default_factory=DiTConfig)
    decode_every: int = 0  # decoded sample videos through the stage-1 decoder; 0: only at the end


@dataclass
class EncodeLatentsConfig:
    stage1: str = "outputs/train_ae/default"  # a train_ae run folder or an export file
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "outputs/latents/default"
    batch_size: int = 8
    concurrency: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    clips_per_shard: int = 64
    overwrite: bool = False  # replace an earlier encode_latents output in `out` (any other non-empty folder is refused)
    ray: RayConfig = field(default_factory=RayConfig)
    verbose: bool = False


@dataclass
class SampleConfig:
    mode: str = "generate"  # generate | reconstruct
    stage1: Optional[str] = None  # default (generate): the stage-1 export recorded by the stage-2 run
    stage2: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "outputs/samples/default"
    overwrite: bool = False  # replace an earlier sample output in `out` (any other non-empty folder is refused)
    num_samples: int = 4
    batch_size: int = 4
    seed: int = 0
    latent_sampler: str = "euler"
    latent_steps: int = 20
    # ROI map for a model trained with model.cond_mask: .npy/.tif [H, W] or [N, H, W] (non-zero = ROI), the
    # ground truth .npz of a jobs/export.py movie ('rois'), or a Neurofinder regions.json, at the sample's frame size
    mask: Optional[str] = None
    flux: Optional[float] = None  # mean photons per pixel per frame, for a model trained with model.cond_flux
    guidance_scale: float = 1.0  # classifier-free guidance: 1 conditional, 0 unconditional, > 1 stronger pull
    # None: the sampler and steps the stage-1 run recorded (model.diffusion.sampler / num_steps)
    decoder_sampler: Optional[str] = None
    decoder_steps: Optional[int] = None
    decoder_grid: Optional[str] = None  # time grid (uniform | shift:S | rho:R); None: the stage-1 run's own
    num_ray_tasks: int = 0  # > 0: fan sampling out over this many Ray tasks
    # long movies (generate): None = the stage-2 training length; else N = 1 + k*s_t frames (s_t from the stage-1
    # export), rolled out in DiT chunks of the training length and streamed through the causal decoder
    num_frames: Optional[int] = None
    context_frames: Optional[int] = None  # latent frames each DiT chunk continues from; None: half the chunk
    # latent frames of left context per decoder window; None: one more than the stage-1 decoder's measured reach
    # (CausalAutoencoder.latent_reach; at least context_frames), so windows join without a seam
    decode_context_frames: Optional[int] = None
    # reconstruction guidance weight pulling each chunk's new latent frames toward agreeing with its context (0: the
    # context is only imposed by replacement); each DiT evaluation then adds a backward pass
    context_guidance: float = 0.0
    # movie files: tiff (ImageJ TIFF) | nwb (NWB TwoPhotonSeries with the provenance) | both; GIF/MP4 previews always
    out_format: str = "tiff"
    fps: int = 10
    ray: RayConfig = field(default_factory=RayConfig)
    verbose: bool = False


@dataclass
class Suite2pJudgeConfig:
    """suite2p settings of ``judge=suite2p`` (cadiff/eval/suite2p_judge.py); the rest are suite2p's defaults."""

    tau: float = 1.0  # indicator decay time (s): suite2p's default; 0.7 for GCaMP6f, 1.25-1.5 for GCaMP6s
    spatial_scale: int = 1  # 1-4: cells of ~6/12/24/48 px (suite2p 0.14.6's own estimate fails under numpy 2)
    threshold_scaling: float = 1.0  # suite2p's detection threshold factor: > 1 fewer ROIs, < 1 more
    max_movies: int = 8  # per set, the first ones by file name
    min_frames: int = 100  # shorter movies are refused (suite2p bins ~tau x rate frames and needs many bins)
    iou: float = 0.5  # ground-truth matching threshold (Neurofinder convention)
    nonrigid: bool = False  # suite2p's block-wise registration (needs fields of several 128-px blocks)


@dataclass
class EvaluateConfig:
    gen: str = "outputs/samples/default"
    ref: str = "outputs/data/sim"
    out: str = "outputs/eval/default"
    ref_split: str = "val"  # shard split of a reference shard folder (every split when absent)
    max_clips: int = 64  # per set, a seeded uniform sample
    acf_lags: int = 10
    # clip size movies are tiled to; None: generated movies are whole clips and the reference is tiled to them
    clip_frames: Optional[int] = None
    clip_height: Optional[int] = None
    clip_width: Optional[int] = None
    hdf5_key: str = "data"  # dataset key of HDF5 movies
    seed: int = 0
    # none | suite2p: also run suite2p's ROI detection on the whole movies of both sets and compare ROI density,
    # size and SNR (F1 against ground truth where the movies have it); needs the judge extra
    judge: str = "none"
    suite2p: Suite2pJudgeConfig = field(default_factory=Suite2pJudgeConfig)
    verbose: bool = False


EXPORT_FORMATS = ("tiff", "nwb", "suite2p")


@dataclass
class ExportConfig:
    """Simulated movies with their ground truth in the formats analysis tools read (cadiff/data/export.py)."""

    source: SourceConfig = field(default_factory=SourceConfig)  # a simulator source: sim (any preset)
    out: str = "outputs/export/sim"
    # tiff: ImageJ TIFF + ground-truth .npz | nwb: NWB with ROIs and traces | suite2p: one folder per movie
    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    overwrite: bool = False  # replace an earlier export output in `out` (any other non-empty folder is refused)
    verbose: bool = False


@dataclass
class ChainConfig:
    """Whole-chain trials of a stage-1 sweep (cadiff.tune.chain): each trial's autoencoder is scored through a
    stage-2 model trained on its latents, by the MMD^2 of decoded samples against the held-out clips."""

    enabled: bool = False
    experiment: str = "dit_tiny"  # the stage-2 base experiment every trial trains on its own latents
    max_steps: Optional[int] = None  # stage-2 training steps (null: the experiment's)
    samples: int = 16  # clips each trial samples, decodes and compares with as many held-out clips
    # further train_latent overrides, quoted on the command line: 'chain.overrides=["model.hidden=128"]'
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    space: str = "noise_schedule"  # search_spaces/<space>.yaml
    stage: str = "ae"  # ae | latent
    experiment: Optional[str] = None  # base experiment for every trial (default: ae_tiny / dit_tiny)
    num_samples: int = 4
    search: str = "random"  # random | grid | optuna
    scheduler: str = "asha"  # asha | none
    # score: the stage's quality score (cadiff.eval.score), comparable across objectives, time samplers and latent
    # sizes; val_loss: each trial's own objective (comparable only between trials of one objective); chain_score
    # (chain.enabled): the clip-statistics MMD^2 of the whole chain's decoded samples (stage-1 score for ASHA's rungs)
    metric: str = "score"  # score | val_loss | chain_score
    mode: str = "min"
    grace_period: int = 1  # ASHA: reports before a trial may be stopped
    report_every: int = 1  # trial steps between reports (validation runs at each report)
    max_concurrent_trials: int = 2
    status_every_s: float = 60.0  # seconds between trial-table lines (and one at the end)
    workers_per_trial: int = 1
    cpus_per_worker: float = 0.5
    name: Optional[str] = None
    resume: bool = False
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    out_root: str = "outputs"
    ray: RayConfig = field(default_factory=RayConfig)
    verbose: bool = False


JOB_SCHEMAS: dict[str, type] = {
    "prepare_data": PrepareDataConfig,
    "train_ae": TrainAEConfig,
    "train_latent": TrainLatentConfig,
    "encode_latents": EncodeLatentsConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
    "sweep": SweepConfig,
    "export": ExportConfig,
}

# ---------------------------------------------------------------------------------------------------------
# composition

_KEY_RE = re.compile(r"full_key: ([\w.\[\]]+)")


def to_structured(cfg: DictConfig | dict, schema: type) -> DictConfig:
    """Merge ``cfg`` into ``schema``; unknown keys and wrong types raise ConfigError naming the key."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or _first_match(_KEY_RE, str(exc)) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"config key '{key}': {msg} (schema {schema.__name__})") from None
    OmegaConf.set_struct(merged, True)
    return merged


def _suggest_key(detail: str, schema: type) -> str:
    """``; did you mean 'trainer.max_steps'?`` for an unknown key close to a schema key, else ''."""
    import difflib

    key = _first_match(_KEY_RE, detail)
    if key is None or "not in" not in detail:
        return ""
    close = difflib.get_close_matches(key, schema_fields(schema), n=1, cutoff=0.8)
    return f"; did you mean '{close[0]}'?" if close else f"; expected a key of {schema.__name__} (see cadiff/config.py)"


def _redact_secrets(text: str, overrides: list[str]) -> str:
    """Hide values of overrides whose key looks like a credential: an error line must never echo a wandb key."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and value and any(m in key.lower() for m in SECRET_MARKERS):
            text = text.replace(value, "<redacted>")
    return text


def _first_match(pattern: re.Pattern, text: str) -> Optional[str]:
    m = pattern.search(text)
    return m.group(1) if m else None


def user_config_dirs() -> list[str]:
    """Extra Hydra search paths: ``$CADIFF_CONFIG_PATH`` (os.pathsep-separated) and ``./outputs/experiments``.

    Sweeps write their best config to ``<out_root>/experiments/experiment/<name>.yaml`` so that
    ``experiment=<name>`` selects it like a packaged experiment.
    """
    dirs = [d for d in os.environ.get("CADIFF_CONFIG_PATH", "").split(os.pathsep) if d]
    default = Path("outputs") / "experiments"
    if default.is_dir():
        dirs.append(str(default))
    return [str(Path(d).resolve()) for d in dirs]


def register_schemas() -> None:
    """Store each job schema as ``<job>_schema`` so the packaged YAML files are typed by it."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for job, schema in JOB_SCHEMAS.items():
        store.store(name=f"{job}_schema", node=schema)


_EXPERIMENT_JOBS = ("train_ae", "train_latent")  # jobs whose defaults hold `optional experiment`


def _check_experiment_exists(overrides: list[str]) -> None:
    """Hydra silently skips a missing ``optional experiment``; a misspelled ``experiment=`` must fail instead."""
    dirs = [Path(__file__).resolve().parent / "conf" / "experiment"]
    for o in overrides:
        if o.startswith("hydra.searchpath="):
            items = o.split("=", 1)[1].strip("[]").split(",")
            dirs += [Path(i.strip().removeprefix("file://")) / "experiment" for i in items if i.strip().startswith("file://")]
    for o in overrides:
        key, sep, name = o.partition("=")
        if key.lstrip("+") != "experiment" or not sep or name in ("", "null"):
            continue
        if not any((d / f"{name}.yaml").is_file() for d in dirs):
            known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
            raise ConfigError(f"experiment '{name}': no experiment/{name}.yaml in {[str(d) for d in dirs]}; expected one of {known}")


def compose(job: str, overrides: list[str] | None = None, validate: bool = True) -> DictConfig:
    """Compose ``cadiff/conf/<job>.yaml`` with Hydra overrides, type it by the job schema and (unless
    ``validate=False``, for printing with ``--cfg job``) check the job's rules."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if job not in JOB_SCHEMAS:
        raise ConfigError(f"unknown job '{job}', expected one of {sorted(JOB_SCHEMAS)}")
    overrides = list(overrides or [])
    search = user_config_dirs()
    if search and not any(o.startswith("hydra.searchpath") for o in overrides):
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in search) + "]")
    if job in _EXPERIMENT_JOBS:
        _check_experiment_exists(overrides)
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            raw = hydra_compose(config_name=job, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if exc.__cause__ is not None:
            detail += " (" + " ".join(str(exc.__cause__).split()) + ")"
        detail = re.sub(r"\s*(reference_type|object_type)=[^\s)]+", "", detail)  # OmegaConf internals, not user keys
        detail = _redact_secrets(detail + _suggest_key(detail, JOB_SCHEMAS[job]), overrides)
        raise ConfigError(f"{job}: bad config or override: {detail}") from None
    finally:
        GlobalHydra.instance().clear()
    raw = OmegaConf.to_container(raw, resolve=True)
    raw.pop("hydra", None)
    cfg = to_structured(raw, JOB_SCHEMAS[job])
    if validate:
        VALIDATORS[job](cfg)
        if "ray" in cfg:  # every job that starts Ray shares the section
            validate_ray(cfg.ray)
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain, resolved dict of a config (for JSON/YAML records and Ray payloads)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(data: dict, schema: type) -> DictConfig:
    return to_structured(data, schema)


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a nested dict (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


# ---------------------------------------------------------------------------------------------------------
# validation


def _require(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def _choice(key: str, value: Any, options: tuple) -> None:
    _require(value in options, key, value, f"one of {list(options)}")


def _time_grid(key: str, value: Any) -> None:
    """The one rule for a sampling time-grid spec (``model.diffusion.grid``, ``decoder_grid``)."""
    try:
        parse_grid(value)
    except ConfigError:
        _require(False, key, value, GRID_FORMS)


def validate_location(key: str, value: Any) -> None:
    """A folder key (``out_root``, ``data.root``, ``out``...): a local path, or ``s3://bucket/prefix``,
    ``gs://bucket/prefix``, ``file:///abs/path`` (see :mod:`cadiff.storage`)."""
    from cadiff.storage import SCHEMES

    text = str(value)
    if "://" not in text:
        return
    scheme, rest = text.split("://", 1)
    expected = f"a local path or {', '.join(f'{s}://...' for s in SCHEMES)}"
    _require(scheme.lower() in SCHEMES, key, value, expected)
    if scheme.lower() == "file":
        _require(rest.startswith("/"), key, value, "file:// with an absolute path (file:///abs/path)")
    else:
        _require(bool(rest.split("/", 1)[0]), key, value, f"{scheme}://<bucket>[/prefix]")


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def validate_diffusion(d: Any, prefix: str) -> None:
    _choice(f"{prefix}.objective", d.objective, ("flow", "ddpm"))
    _choice(f"{prefix}.time_sampler", d.time_sampler, ("uniform", "logit_normal"))
    _require(d.logit_std > 0, f"{prefix}.logit_std", d.logit_std, "> 0")
    _require(d.shift > 0, f"{prefix}.shift", d.shift, "> 0")
    _choice(f"{prefix}.loss_weighting", d.loss_weighting, ("none", "min_snr"))
    _choice(f"{prefix}.ddpm_schedule", d.ddpm_schedule, ("linear", "cosine"))
    _choice(f"{prefix}.ddpm_prediction", d.ddpm_prediction, ("eps", "v"))
    samplers = FlowMatching.samplers if d.objective == "flow" else DDPM.samplers
    _choice(f"{prefix}.sampler", d.sampler, samplers)
    _require(d.num_steps >= 1, f"{prefix}.num_steps", d.num_steps, "an integer >= 1 (NFE > 0)")
    _time_grid(f"{prefix}.grid", d.grid)


def mean_head_of(m: Any) -> Optional[str]:
    """The network of a stage-1 model's deterministic head: ``model.mean_head``, ``upsampler`` where it is null,
    None for the flow form (``decoder_form=flow``, or null with the DDPM objective), which has no mean head."""
    flow_form = m.decoder_form == "flow" or (m.decoder_form is None and m.diffusion.objective != "flow")
    if m.kind == "diffae" and flow_form:
        return None
    return m.mean_head or "upsampler"


def dec_num_res_blocks_of(m: Any) -> int:
    """``model.dec_num_res_blocks``, or where it is null 0 for a model whose only decoder network is the upsampler
    (a decoder UNet exists in the flow form and with ``residual_unet``) and 1 otherwise."""
    if m.dec_num_res_blocks is not None:
        return int(m.dec_num_res_blocks)
    # the flow form has no mean head (mean_head_of is None there); residual_unet adds a UNet beside the head
    lone_upsampler = mean_head_of(m) == "upsampler" and not (m.kind == "diffae" and m.residual_unet)
    return 0 if lone_upsampler else 1


def validate_autoencoder(m: Any, prefix: str = "model") -> None:
    _choice(f"{prefix}.kind", m.kind, ("diffae", "regression"))
    _require(_is_pow2(m.temporal_downsample), f"{prefix}.temporal_downsample", m.temporal_downsample, "a power of 2")
    _require(_is_pow2(m.spatial_downsample), f"{prefix}.spatial_downsample", m.spatial_downsample, "a power of 2")
    levels = len(m.channel_mult) - 1
    _require(
        m.spatial_downsample <= 2**levels and m.temporal_downsample <= m.spatial_downsample,
        f"{prefix}.spatial_downsample",
        m.spatial_downsample,
        f"<= 2**(len(channel_mult)-1) = {2**levels} and >= temporal_downsample ({m.temporal_downsample})",
    )
    _require(m.z_channels >= 1, f"{prefix}.z_channels", m.z_channels, ">= 1")
    _require(m.num_res_blocks >= 0, f"{prefix}.num_res_blocks", m.num_res_blocks, ">= 0")
    _require(m.dec_num_res_blocks is None or m.dec_num_res_blocks >= 0, f"{prefix}.dec_num_res_blocks",
             m.dec_num_res_blocks, ">= 0 or null")
    _require(m.num_res_blocks > 0 or len(set(m.channel_mult)) == 1, f"{prefix}.channel_mult", list(m.channel_mult),
             f"one value repeated with {prefix}.num_res_blocks=0: only residual blocks change the encoder's width "
             f"(set {prefix}.num_res_blocks >= 1 for a widening encoder)")
    _choice(f"{prefix}.latent_reg", m.latent_reg, ("kl", "none"))
    _choice(f"{prefix}.regression_loss", m.regression_loss, ("l2", "l1"))
    validate_diffusion(m.diffusion, f"{prefix}.diffusion")
    _require(m.noise_std is None or m.noise_std > 0, f"{prefix}.noise_std", m.noise_std, "> 0 or null")
    if m.decoder_form is not None:
        _choice(f"{prefix}.decoder_form", m.decoder_form, ("mean_flow", "flow"))
    _require(m.mean_loss_weight > 0, f"{prefix}.mean_loss_weight", m.mean_loss_weight, "> 0")
    if m.mean_head is not None:
        _choice(f"{prefix}.mean_head", m.mean_head, ("unet", "upsampler"))
    if m.mean_head == "upsampler" and mean_head_of(m) is None:
        raise ConfigError(f"{prefix}.mean_head='upsampler' is the network of the mean head, which "
                          f"{prefix}.decoder_form='flow' does not have: use decoder_form=mean_flow")
    if mean_head_of(m) == "upsampler":
        deep = len(m.dec_channel_mult) - 1
        _require(2**deep <= m.spatial_downsample, f"{prefix}.dec_channel_mult", list(m.dec_channel_mult),
                 f"at most 1 + log2(spatial_downsample) = {1 + int(math.log2(m.spatial_downsample))} levels for "
                 f"{prefix}.mean_head=upsampler{'' if m.mean_head else ' (the default)'}: its coarsest level may not "
                 f"be coarser than the latent grid (or set {prefix}.mean_head=unet)")
    _choice(f"{prefix}.noise_draw", m.noise_draw, ("auto", "gaussian", "poisson"))
    _choice(f"{prefix}.mean_target", m.mean_target, ("input", "photon_split"))
    _require(0.0 < m.split_fraction < 1.0, f"{prefix}.split_fraction", m.split_fraction, "in (0, 1)")
    if m.mean_target == "photon_split" and m.kind == "diffae" and m.decoder_form == "flow":
        raise ConfigError(f"{prefix}.mean_target='photon_split' trains the mean head: it needs "
                          f"{prefix}.decoder_form=mean_flow (or null with the flow objective)")
    if m.noise_draw == "poisson" and m.residual_unet:
        raise ConfigError(f"{prefix}.noise_draw='poisson' draws counts directly, without the flow: it needs "
                          f"{prefix}.residual_unet=false")
    _choice(f"{prefix}.noise_model.kind", m.noise_model.kind, ("none", "anscombe", "photon"))
    if m.noise_model.kind != "none":
        _require(m.noise_model.scale > 0, f"{prefix}.noise_model.scale", m.noise_model.scale, "> 0")
        _require(m.noise_model.read_noise_photons >= 0, f"{prefix}.noise_model.read_noise_photons",
                 m.noise_model.read_noise_photons, ">= 0")
    if m.kind == "diffae" and (m.noise_skip or m.noise_std or m.decoder_form == "mean_flow") \
            and m.diffusion.objective != "flow":
        raise ConfigError(f"{prefix}.decoder_form={m.decoder_form!r} / noise_skip / noise_std: the analytic noise term "
                          f"needs diffusion.objective=flow, got {m.diffusion.objective!r} (use decoder_form=flow "
                          "with noise_skip=false for a DDPM decoder)")


def validate_clip_for_model(frames: int, height: int, width: int, m: Any, key: str) -> None:
    """Causal stage-1 clips have T = 1 + k * temporal_downsample and H, W divisible by the spatial factor."""
    s_t, s_hw = m.temporal_downsample, m.spatial_downsample
    _require(
        frames >= 1 and (frames - 1) % s_t == 0,
        f"{key}.frames",
        frames,
        f"1 + k*{s_t} (causal model with temporal_downsample={s_t}), e.g. {1 + 2 * s_t} or {1 + 4 * s_t}",
    )
    _require(height % s_hw == 0 and width % s_hw == 0, f"{key}.height/width", (height, width), f"multiples of {s_hw}")


def validate_trainer(t: Any, prefix: str = "trainer") -> None:
    _require(t.max_steps >= 1, f"{prefix}.max_steps", t.max_steps, ">= 1")
    _require(t.stop_at_step is None or t.stop_at_step >= 1, f"{prefix}.stop_at_step", t.stop_at_step, ">= 1 or null")
    _require(t.num_workers >= 1, f"{prefix}.num_workers", t.num_workers, ">= 1")
    _require(t.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", t.cpus_per_worker, "> 0")
    _require(t.lr > 0, f"{prefix}.lr", t.lr, "a positive learning rate")
    _require(t.grad_accum >= 1, f"{prefix}.grad_accum", t.grad_accum, ">= 1")
    _require(t.grad_clip >= 0, f"{prefix}.grad_clip", t.grad_clip, ">= 0 (0 disables)")
    _require(0 < t.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", t.min_lr_ratio, "in (0, 1]")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), f"{prefix}.betas", list(t.betas), "[b1, b2] in [0, 1)")
    _require(t.malloc_mmap_threshold_kb is None or 1 <= t.malloc_mmap_threshold_kb <= MMAP_THRESHOLD_MAX_KB,
             f"{prefix}.malloc_mmap_threshold_kb", t.malloc_mmap_threshold_kb, f"1..{MMAP_THRESHOLD_MAX_KB} or null")
    _choice(f"{prefix}.precision", t.precision, ("fp32", "bf16", "auto"))
    _choice(f"{prefix}.compile", t.compile, ("none", "blocks", "model"))
    _choice(f"{prefix}.compile_backend", t.compile_backend, ("inductor", "aot_eager"))
    for k in ("log_every", "val_every", "ckpt_every", "num_to_keep"):
        _require(getattr(t, k) >= 1, f"{prefix}.{k}", getattr(t, k), ">= 1")
    _require(_is_resume_choice(t.resume_from), f"{prefix}.resume_from", t.resume_from,
             "null (the latest checkpoint), a checkpoint step >= 1 or a checkpoint folder path")


def _is_resume_choice(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return value is None or (isinstance(value, int) and value >= 1) or (isinstance(value, str) and bool(value.strip()))


def _check_compile_strategy(cfg: Any) -> None:
    # DeepSpeed's ZeRO hooks gather/partition parameters around every submodule call, which dynamo would trace
    if cfg.trainer.compile != "none" and cfg.strategy.name == "deepspeed":
        raise ConfigError(f"trainer.compile={cfg.trainer.compile!r} with strategy.name=deepspeed: not supported "
                          "(ZeRO's parameter hooks break graph capture); use trainer.compile=none, or ddp/fsdp2")


STRATEGY_NAMES = ("single", "ddp", "deepspeed", "fsdp2")


def validate_strategy(s: Any, num_workers: int | None = None) -> None:
    """Strategy rules; ``num_workers`` (the trainer's) is checked against ``single`` when given."""
    _choice("strategy.name", s.name, STRATEGY_NAMES)
    if s.name == "deepspeed":
        _require(s.zero_stage in (1, 2, 3), "strategy.zero_stage", s.zero_stage, "1, 2 or 3 for DeepSpeed ZeRO")
    else:
        _require(s.zero_stage == 0, "strategy.zero_stage", s.zero_stage, f"0 for strategy '{s.name}'")
    if s.backend is not None:
        _choice("strategy.backend", s.backend, ("gloo", "nccl"))
    if s.name == "single" and num_workers is not None:
        _require(num_workers == 1, "trainer.num_workers", num_workers, "1 with strategy=single")


def validate_ema(e: Any) -> None:
    _require(0 <= e.decay < 1, "ema.decay", e.decay, "in [0, 1)")
    _require(e.update_every >= 1, "ema.update_every", e.update_every, ">= 1")


LOGGER_NAMES = ("none", "wandb", "tensorboard")
RAY_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def validate_logger(lg: Any) -> None:
    _choice("logger.name", lg.name, LOGGER_NAMES)
    _choice("logger.mode", lg.mode, ("offline", "online", "disabled"))
    if lg.name == "tensorboard" and lg.mode != "disabled":
        import importlib.util

        _require(importlib.util.find_spec("tensorboard") is not None, "logger.name", lg.name,
                 "an installed tensorboard package for logger=tensorboard (pip install tensorboard)")


def validate_ray(r: Any) -> None:
    _choice("ray.log_level", r.log_level, RAY_LOG_LEVELS)


SOURCE_NAMES = ("sim", "tiff", "hdf5", "nwb", "neurofinder", "allen")


def validate_prepare_data(cfg: Any) -> None:
    validate_location("out", cfg.out)
    _choice("source.name", cfg.source.name, SOURCE_NAMES)
    if cfg.source.name in ("tiff", "hdf5", "nwb"):
        _require(bool(cfg.source.path), "source.path", cfg.source.path, f"a file or folder for source={cfg.source.name}")
    _choice("source.preset", cfg.source.preset, ("default", "two_photon"))
    _choice("source.calibration", cfg.source.calibration, CALIBRATIONS)
    if cfg.source.calibration == "none":
        given = {k: getattr(cfg.source, k) for k in ("gain", "offset", "read_noise") if getattr(cfg.source, k) is not None}
        _require(not given, "source.calibration", "none", f"no source.gain/offset/read_noise with it (given {given}): "
                 "drop them, or use source.calibration=auto to normalize in photons with them")
    if cfg.source.name in ("neurofinder", "allen"):
        _validate_archive_source(cfg.source)
    c = cfg.clip
    for k in ("frames", "height", "width"):
        _require(getattr(c, k) >= 1, f"clip.{k}", getattr(c, k), ">= 1")
    _require(0 <= cfg.val_fraction < 1, "val_fraction", cfg.val_fraction, "in [0, 1)")
    _require(cfg.clips_per_shard >= 1, "clips_per_shard", cfg.clips_per_shard, ">= 1")
    _choice("normalization.kind", cfg.normalization.kind, ("photon", "anscombe"))
    if cfg.normalization.scale is not None:
        _require(cfg.normalization.scale > 0, "normalization.scale", cfg.normalization.scale, "> 0")


def _validate_archive_source(src: Any) -> None:
    """Public archives, at load time: the id and URL checks the download itself runs; positive zip-bomb caps."""
    from cadiff.data.sources import allen, neurofinder
    from cadiff.data.sources.download import check_base_url

    (neurofinder if src.name == "neurofinder" else allen).check_ids(list(src.ids))
    check_base_url(src.base_url)
    _require(src.zip_max_total_gib > 0, "source.zip_max_total_gib", src.zip_max_total_gib, "> 0 (GiB)")
    _require(src.zip_max_ratio >= 1, "source.zip_max_ratio", src.zip_max_ratio, ">= 1 (uncompressed / compressed)")


def _check_score(cfg: Any, data_key: str) -> None:
    """``trainer.score`` compares sets (MMD^2) and shuffled latents: it needs two val clips at least."""
    clips = getattr(cfg, data_key).num_val_clips
    if cfg.trainer.score:
        _require(clips >= 2, f"{data_key}.num_val_clips", clips, ">= 2 with trainer.score=true")


def _validate_data(d: Any, prefix: str) -> None:
    _require(d.batch_size >= 1, f"{prefix}.batch_size", d.batch_size, ">= 1")
    _require(d.prefetch_batches >= 1, f"{prefix}.prefetch_batches", d.prefetch_batches, ">= 1")
    _require(d.cpus_per_task > 0, f"{prefix}.cpus_per_task", d.cpus_per_task, "> 0 (CPUs per Ray Data task)")
    _choice(f"{prefix}.corrupt_shards", d.corrupt_shards, ("fail", "skip"))
    if "mask_subgrid" in d:
        _require(_is_pow2(d.mask_subgrid), f"{prefix}.mask_subgrid", d.mask_subgrid,
                 "a power of 2 (1: one ROI fraction per latent pixel)")


def _validate_training(cfg: Any, data_key: str, validate_model: Callable[[Any], None]) -> None:
    """The rules both training jobs share: output and data locations, the model, trainer, strategy (and compile
    under it), EMA, logger, the data loader (``cfg.<data_key>``) and the sweep score."""
    validate_location("out_root", cfg.out_root)
    data = getattr(cfg, data_key)
    validate_location(f"{data_key}.root", data.root)
    validate_model(cfg.model)
    validate_trainer(cfg.trainer)
    validate_strategy(cfg.strategy, cfg.trainer.num_workers)
    _check_compile_strategy(cfg)
    validate_ema(cfg.ema)
    validate_logger(cfg.logger)
    _validate_data(data, data_key)
    _check_score(cfg, data_key)


def validate_train_ae(cfg: Any) -> None:
    _validate_training(cfg, "data", validate_autoencoder)
    d = cfg.data
    for k in ("crop_frames", "crop_height", "crop_width"):
        v = getattr(d, k)
        _require(v is None or v >= 1, f"data.{k}", v, ">= 1 or null")
    if d.crop_frames is not None:
        _require(
            (d.crop_frames - 1) % cfg.model.temporal_downsample == 0,
            "data.crop_frames",
            d.crop_frames,
            f"1 + k*{cfg.model.temporal_downsample} (causal model with temporal_downsample={cfg.model.temporal_downsample})",
        )
    for k in ("crop_height", "crop_width"):
        v = getattr(d, k)
        s_hw = cfg.model.spatial_downsample
        _require(v is None or v % s_hw == 0, f"data.{k}", v, f"a multiple of model.spatial_downsample={s_hw}")


def dit_size(m: Any) -> tuple[int, int, int]:
    """(hidden, depth, heads) of a DiT config: ``size`` from :data:`DIT_SIZES`, each overridable by its own key."""
    hidden, depth, heads = DIT_SIZES[m["size"]]
    return int(m["hidden_size"] or hidden), int(m["depth"] or depth), int(m["num_heads"] or heads)


def validate_dit(m: Any, prefix: str = "model") -> None:
    _choice(f"{prefix}.size", m.size, tuple(DIT_SIZES))
    _require(len(m.patch_size) == 3 and all(p >= 1 for p in m.patch_size), f"{prefix}.patch_size", list(m.patch_size), "[pt, ph, pw] >= 1")
    hidden, depth, heads = dit_size(m)
    _require(hidden >= 1 and depth >= 1 and heads >= 1, f"{prefix}.hidden_size/depth/num_heads", (hidden, depth, heads), ">= 1")
    _require(hidden % heads == 0, f"{prefix}.hidden_size", hidden, f"divisible by num_heads={heads}")
    _require(0 <= m.cond_dropout < 1, f"{prefix}.cond_dropout", m.cond_dropout, "a probability in [0, 1)")
    if m.mask_subgrid is not None:
        _require(_is_pow2(m.mask_subgrid), f"{prefix}.mask_subgrid", m.mask_subgrid,
                 "a power of 2 (1: one ROI fraction per latent pixel), or null for latents.mask_subgrid")
    if m.conditions is not None:
        _require(all(c in CONDITIONS for c in m.conditions), f"{prefix}.conditions", list(m.conditions),
                 f"names from {list(CONDITIONS)}")
    validate_diffusion(m.diffusion, f"{prefix}.diffusion")


def validate_train_latent(cfg: Any) -> None:
    _validate_training(cfg, "latents", validate_dit)


def validate_sample(cfg: Any) -> None:
    _choice("mode", cfg.mode, ("generate", "reconstruct"))
    if cfg.mode == "generate":
        _require(bool(cfg.stage2), "stage2", cfg.stage2, "a train_latent run folder or export for mode=generate")
    else:
        _require(bool(cfg.stage1), "stage1", cfg.stage1, "a train_ae run folder or export for mode=reconstruct")
    _require(cfg.num_samples >= 1, "num_samples", cfg.num_samples, "a positive sample count")
    _choice("out_format", cfg.out_format, ("tiff", "nwb", "both"))
    _require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, ">= 1")
    _require(cfg.latent_steps >= 1, "latent_steps", cfg.latent_steps, ">= 1 (NFE > 0)")
    _require(cfg.decoder_steps is None or cfg.decoder_steps >= 1, "decoder_steps", cfg.decoder_steps,
             ">= 1 (NFE > 0), or null for the stage-1 run's own")
    if cfg.decoder_sampler is not None:
        _choice("decoder_sampler", cfg.decoder_sampler, tuple(dict.fromkeys(FlowMatching.samplers + DDPM.samplers)))
    if cfg.decoder_grid is not None:
        _time_grid("decoder_grid", cfg.decoder_grid)
    _validate_long_movie(cfg)
    _validate_conditions(cfg)


def _validate_conditions(cfg: Any) -> None:
    """``mask``/``flux``/``guidance_scale``; whether the stage-2 model takes them is checked once it is loaded."""
    _require(math.isfinite(cfg.guidance_scale) and cfg.guidance_scale >= 0, "guidance_scale", cfg.guidance_scale,
             "a finite number >= 0 (1: conditional, 0: unconditional)")
    given = cfg.mask is not None or cfg.flux is not None
    _require(not given or cfg.mode == "generate", "mask/flux", (cfg.mask, cfg.flux), "null for mode=reconstruct")
    if cfg.flux is not None:
        flux_value(cfg.flux, "config key 'flux'")
    _require(cfg.mask is None or Path(cfg.mask).suffix.lower() in MASK_SUFFIXES, "mask", cfg.mask,
             f"a file ending in one of {list(MASK_SUFFIXES)}")


def _validate_long_movie(cfg: Any) -> None:
    """``num_frames`` and its chunking keys; ``1 + k*s_t`` and ``context_frames < chunk`` are checked once the
    exports are loaded (:func:`cadiff.inference.long_movie.plan_long_movie`), before any sampling."""
    for key in ("num_frames", "context_frames", "decode_context_frames"):
        value = getattr(cfg, key)
        _require(value is None or value >= 1, key, value, "a positive frame count, or null")
    _require(math.isfinite(cfg.context_guidance) and cfg.context_guidance >= 0, "context_guidance",
             cfg.context_guidance, "a finite number >= 0 (0: context by replacement only)")
    _require(cfg.context_guidance == 0 or cfg.num_frames is not None, "context_guidance", cfg.context_guidance,
             "0 without num_frames (only a long movie's chunks have a context to agree with)")
    if cfg.num_frames is not None:
        _require(cfg.mode == "generate", "num_frames", cfg.num_frames, "null for mode=reconstruct (clips keep their length)")
        _require(cfg.out_format == "tiff", "out_format", cfg.out_format,
                 "'tiff' with num_frames (long movies are streamed to TIFF page by page)")
        _require(cfg.num_ray_tasks == 0, "num_ray_tasks", cfg.num_ray_tasks,
                 "0 with num_frames (long movies stream to disk in this process)")


def validate_encode_latents(cfg: Any) -> None:
    _require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, ">= 1")
    _require(cfg.concurrency >= 1, "concurrency", cfg.concurrency, ">= 1")


def validate_sweep(cfg: Any) -> None:
    _choice("stage", cfg.stage, ("ae", "latent"))
    _choice("search", cfg.search, ("random", "grid", "optuna"))
    _choice("scheduler", cfg.scheduler, ("asha", "none"))
    _choice("metric", cfg.metric, ("score", "val_loss", "chain_score"))
    _choice("mode", cfg.mode, ("min", "max"))
    _require(cfg.num_samples >= 1, "num_samples", cfg.num_samples, ">= 1")
    _require(cfg.workers_per_trial >= 1, "workers_per_trial", cfg.workers_per_trial, ">= 1")
    _require(cfg.cpus_per_worker > 0, "cpus_per_worker", cfg.cpus_per_worker, "> 0")
    _require(cfg.report_every >= 1, "report_every", cfg.report_every, ">= 1")
    _require(cfg.max_concurrent_trials >= 1, "max_concurrent_trials", cfg.max_concurrent_trials, ">= 1")
    _require(cfg.status_every_s > 0, "status_every_s", cfg.status_every_s, "> 0 seconds")
    _validate_data(cfg.data, "data")  # forwarded to every trial: a bad value fails here, not per trial
    _validate_data(cfg.latents, "latents")
    chain = cfg.chain
    _require(cfg.metric != "chain_score" or chain.enabled, "metric", cfg.metric,
             "score or val_loss, or chain.enabled=true for chain_score")
    if chain.enabled:
        _require(cfg.stage == "ae", "chain.enabled", True, "a stage=ae sweep (the chain starts from each trial's "
                 "autoencoder)")
        # MMD^2 needs 2 clips a side; its split-half reference needs 4 held-out clips
        _require(chain.samples >= 4, "chain.samples", chain.samples, ">= 4")
        _require(chain.max_steps is None or chain.max_steps >= 1, "chain.max_steps", chain.max_steps, ">= 1 or null")


def validate_evaluate(cfg: Any) -> None:
    _require(cfg.max_clips >= 1, "max_clips", cfg.max_clips, ">= 1")
    _require(cfg.acf_lags >= 1, "acf_lags", cfg.acf_lags, ">= 1")
    for k, least in (("clip_frames", 4), ("clip_height", 3), ("clip_width", 3)):
        v = getattr(cfg, k)
        _require(v is None or v >= least, k, v, f">= {least} or null")
    _require(bool(cfg.gen) and bool(cfg.ref) and bool(cfg.out), "gen/ref/out", (cfg.gen, cfg.ref, cfg.out), "three paths")
    _choice("judge", cfg.judge, JUDGES)
    s2p = cfg.suite2p
    _require(s2p.tau > 0, "suite2p.tau", s2p.tau, "> 0 seconds")
    _require(1 <= s2p.spatial_scale <= 4, "suite2p.spatial_scale", s2p.spatial_scale,
             "1-4 (cells ~6/12/24/48 px; suite2p's automatic 0 fails under numpy 2)")
    _require(s2p.threshold_scaling > 0, "suite2p.threshold_scaling", s2p.threshold_scaling, "> 0")
    _require(s2p.max_movies >= 1, "suite2p.max_movies", s2p.max_movies, ">= 1")
    _require(s2p.min_frames >= 20, "suite2p.min_frames", s2p.min_frames, ">= 20")
    _require(0 < s2p.iou <= 1, "suite2p.iou", s2p.iou, "in (0, 1]")


def validate_export(cfg: Any) -> None:
    _require(cfg.source.name == "sim", "source.name", cfg.source.name,
             "sim: export writes simulated movies with their ground truth (real recordings have none)")
    _choice("source.preset", cfg.source.preset, ("default", "two_photon"))
    _require(cfg.source.num_movies >= 1, "source.num_movies", cfg.source.num_movies, ">= 1")
    _require(min(cfg.source.frames, cfg.source.height, cfg.source.width) >= 1, "source.frames/height/width",
             (cfg.source.frames, cfg.source.height, cfg.source.width), ">= 1")
    formats = list(cfg.formats)
    _require(bool(formats) and len(set(formats)) == len(formats) and set(formats) <= set(EXPORT_FORMATS), "formats",
             formats, f"a non-empty list of distinct formats from {list(EXPORT_FORMATS)}")


VALIDATORS = {
    "evaluate": validate_evaluate,
    "prepare_data": validate_prepare_data,
    "train_ae": validate_train_ae,
    "train_latent": validate_train_latent,
    "sample": validate_sample,
    "encode_latents": validate_encode_latents,
    "sweep": validate_sweep,
    "export": validate_export,
}


def schema_fields(schema: type) -> list[str]:
    """Dotted names of every leaf key of a schema (used to check sweep spaces)."""
    out: list[str] = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out += [f"{f.name}.{k}" for k in schema_fields(type(default))]
        else:
            out.append(f.name)
    return out
