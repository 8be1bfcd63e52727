"""Whole-chain sweep trials: stage 1, its latents, a stage-2 model on them, and one pixel-space score of the pair.

A stage-1 sweep ranks autoencoders by their reconstructions (``score``). A latent-size choice trades
reconstruction against how hard its latents are to generate, so a latent-size sweep has to score the whole
chain. With ``chain.enabled=true`` every trial, once its autoencoder has finished, encodes the sweep's data
with it (``encode_latents``, into ``<trials>/latents/<trial>``), trains a stage-2 DiT from ``chain.experiment``
on those latents (``<trials>/train_latent/<trial>``), samples ``chain.samples`` latents, decodes them with the
trial's own decoder and compares the clips with as many held-out clips, in photon units:

* ``chain_score``: the RBF-MMD^2 of the per-clip statistics features (noise, intensity, temporal and spatial
  statistics) that ``jobs/evaluate.py`` and the generation benchmark report (:func:`cadiff.eval.metrics.evaluate_sets`);
  lower is better, ~0 when the samples are distributed as the held-out clips, comparable across latent sizes
  because every trial is measured against the same clips in pixels;
* ``chain_mmd2_split_half``: the same MMD^2 between halves of the held-out clips (the floor at this sample size);
* ``chain_gain_ratio``: photon-transfer gain of the samples over that of the held-out clips (NaN, null in
  ``chain.json``, when the samples have no photon-transfer fit, e.g. photon-starved clips of an undertrained chain).

The stage-1 reports drive ASHA's rungs (the cheaper proxy); the trial's last report adds the chain keys, which
``metric=chain_score`` ranks by. The trial writes them to ``chain.json`` in its stage-2 run folder too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadiff.config import compose
from cadiff.data.shards import read_index
from cadiff.errors import DataError
from cadiff.eval.inputs import center_crop, load_set
from cadiff.eval.metrics import evaluate_sets, to_jsonable
from cadiff.inference.encode import encode_latents
from cadiff.inference.sample import load_pair, sample_decoded
from cadiff.io import write_json_atomic
from cadiff.train.launch import run_training
from cadiff.train.media import to_preview_units

log = logging.getLogger(__name__)

CHAIN_KEYS = ("chain_score", "chain_mmd2_split_half", "chain_gain_ratio")
RESULT_FILE = "chain.json"


def chain_settings(cfg: Any) -> dict[str, Any] | None:
    """The sweep's ``chain`` section as plain values for the trials (None when whole-chain scoring is off)."""
    chain = cfg.chain
    if not chain.enabled:
        return None
    return {"experiment": str(chain.experiment), "max_steps": chain.max_steps, "samples": int(chain.samples),
            "overrides": [str(o) for o in chain.overrides]}


def stage2_overrides(chain: dict[str, Any], latents_root: str | Path, trial_name: str, sweep: dict[str, Any],
                     seed: int) -> list[str]:
    """``train_latent`` overrides of a trial's stage 2: the chain's experiment on the trial's own latents, with
    the sweep's per-trial resources, then ``chain.max_steps`` and ``chain.overrides``."""
    overrides = [f"experiment={chain['experiment']}", f"latents.root={latents_root}", f"run_name={trial_name}",
                 f"out_root={sweep['trials_root']}", f"trainer.num_workers={sweep['workers_per_trial']}",
                 f"trainer.cpus_per_worker={sweep['cpus_per_worker']}", f"seed={seed}"]
    if chain["max_steps"] is not None:
        overrides.append(f"trainer.max_steps={chain['max_steps']}")
    return overrides + list(chain["overrides"])


def check_stage2_config(chain: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Compose the trials' stage-2 config once on the driver: a bad experiment or override fails before any trial."""
    compose("train_latent", stage2_overrides(chain, Path(sweep["trials_root"]) / "latents" / "probe", "probe",
                                             sweep, 0))


def check_chain_data(data_root: str | Path) -> None:
    """The sweep's clip data holds the 4 held-out clips a chain score needs (its val split, else every split, as
    :func:`chain_metrics` reads them): checked on the driver, before any trial."""
    splits = read_index(data_root)["splits"]
    held_out = splits.get("val", {}).get("num_clips") or sum(s.get("num_clips", 0) for s in splits.values())
    if held_out < 4:
        raise DataError(f"data.root '{data_root}': {held_out} held-out clips, expected at least 4 to score the chain "
                        "(chain.enabled=true; prepare more or longer recordings)")


def run_chain(stage1_cfg: Any, stage1_run: str, sweep: dict[str, Any], trial_name: str) -> dict[str, float]:
    """Encode, train stage 2 and score the chain of one finished stage-1 trial (see the module doc)."""
    chain = sweep["chain"]
    latents = Path(sweep["trials_root"]) / "latents" / trial_name
    data_root = str(stage1_cfg.data.root)
    encoded, _ = encode_latents(compose("encode_latents", [
        f"stage1={stage1_run}", f"data.root={data_root}", f"out={latents}",
        f"cpus_per_actor={sweep['cpus_per_worker']}", "overwrite=true"]))
    log.info("chain %s: %s", trial_name, encoded)
    cfg2 = compose("train_latent", stage2_overrides(chain, latents, trial_name, sweep, int(stage1_cfg.seed)))
    # what `jobs/train_latent.py` runs: a worker group on the trial's cluster, or in this trial's process for
    # 'chain.overrides=["strategy=single"]' (no worker group to start: the cheapest chain trial)
    _, location = run_training(cfg2, "latent")
    metrics = chain_metrics(location, data_root, chain["samples"], int(stage1_cfg.seed))
    # strict JSON: a value the samples give no estimate of (no photon-transfer fit) is null
    write_json_atomic(Path(location) / RESULT_FILE, to_jsonable(
        {**metrics, "stage1": stage1_run, "latents": str(latents), "samples": chain["samples"]}))
    log.info("chain %s: chain_score=%.4g (split-half %s) gain ratio %s", trial_name, metrics["chain_score"],
             metrics["chain_mmd2_split_half"], metrics["chain_gain_ratio"])
    return metrics


@torch.no_grad()
def sample_clips(stage2: str | Path, num: int, seed: int) -> np.ndarray:
    """``num`` unconditional samples of a stage-2 export decoded by its stage-1 decoder, in photon units
    ``[N, T, H, W]`` (the source's own units for raw-unit data), the models' default samplers."""
    dit, meta, _, decoder, ae_meta, _ = load_pair(stage2)
    clips = sample_decoded(dit, decoder, meta["data"], num, torch.Generator().manual_seed(seed))
    sources = ae_meta["data"]["sources"]
    return to_preview_units(clips, ae_meta["data"]["normalization"], sources[sorted(sources)[0]])


def chain_metrics(stage2: str | Path, data_root: str | Path, num: int, seed: int) -> dict[str, float]:
    """The chain keys of a stage-2 export: ``num`` decoded samples against ``num`` held-out clips of ``data_root``
    (its val split; every split when it has none), centre-cropped to the samples' shape."""
    generated = sample_clips(stage2, num, seed)
    held_out = load_set(data_root, split="val", max_clips=num, seed=seed)
    shape = tuple(generated.shape[1:])
    reference = [center_crop(c, shape) for c in held_out.in_units()]
    if any(c.shape != shape for c in reference):
        raise DataError(f"data.root '{data_root}': held-out clips {held_out.clips[0].shape} are smaller than the "
                        f"chain's samples {shape}")
    if len(reference) < 4:
        raise DataError(f"data.root '{data_root}': {len(reference)} held-out clips, expected at least 4 to score the "
                        "chain (prepare more data)")
    if not np.isfinite(generated).all():  # a diverged chain ranks last instead of failing the sweep
        return {"chain_score": math.inf, "chain_mmd2_split_half": math.nan, "chain_gain_ratio": math.nan}
    report = evaluate_sets(list(generated), reference, rate_hz=held_out.rate_hz(), seed=seed, units=held_out.units(),
                           ref_groups=held_out.recordings)
    mmd = report["mmd"]
    return {"chain_score": _number(mmd["mmd2"], math.inf),
            "chain_mmd2_split_half": _number(mmd["baseline_mmd2"], math.nan),
            "chain_gain_ratio": _number(report["noise"]["gain_ratio"], math.nan)}


def _number(value: Any, missing: float) -> float:
    return float(value) if value is not None else missing
