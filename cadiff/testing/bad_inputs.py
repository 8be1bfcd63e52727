"""The bad-input matrix (issue 8), shared by ``tests/test_bad_inputs.py`` and ``benchmarks/reliability.py``.

Every case must raise a specific cadiff error naming the offending path/key and the expected form, and the
job entry point turns it into exit code 2, exactly one ``cadiff <job>: error:`` line on stdout, no traceback
(unless ``--verbose``) and no partial output. Each case is a builder ``(tmp, env) -> Case`` so that every
check gets fresh inputs. Almost every case fails before Ray starts; training cases use ``strategy=single``
so the failure is reached without a cluster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cadiff.config import compose
from cadiff.data.prepare import prepare_data
from cadiff.data.shards import iter_shard, write_index, write_shards
from cadiff.data.simulate import simulate_movie
from cadiff.data.sources.download import record_download
from cadiff.errors import CadiffError, CheckpointError, ConfigError, DataError, NoPhotonSignature
from cadiff.jobs import JOBS
from cadiff.models.registry import build_model
from cadiff.runtime.exports import export_model
from cadiff.testing import run_job_in_process
from cadiff.testing.data import SIM_DATA_OVERRIDES, log_scaled_movie
from cadiff.testing.faults import corrupt_checkpoint_file

REPO = Path(__file__).resolve().parents[2]  # the checkout: jobs/<job>.py are the command lines
CLIP = ["clip.frames=17", "clip.height=32", "clip.width=32"]
# tiny, deterministic prepare_data settings: calibration reads frames 0-7 and 48-55 of a 60-frame movie
PREPARE = [*CLIP, "source.rate_hz=10", "val_fraction=0", "source.calibration_frames=16", "clips_per_shard=1"]
TRAIN_SINGLE = ["experiment=ae_tiny", "strategy=single", "trainer.num_workers=1", "trainer.max_steps=4",
                "trainer.ckpt_every=4", "trainer.val_every=4", "trainer.log_every=1"]

@dataclass
class Env:
    """Shared, read-only inputs: prepared tiny clip shards and a finished 3-step stage-1 run."""

    data_root: Path
    stage1_run: Path


@dataclass
class Case:
    """One bad input: the job and its overrides, the expected error and the outputs that must not change."""

    job: str
    args: list[str]
    error: type[CadiffError]
    match: list[str]  # regexes the message must contain: the offending path/key and the expected form
    guard: list[Path] = field(default_factory=list)  # absent before and after, or unchanged


# ---------------------------------------------------------------------------------------------------------
# inputs


def _movie(frames: int = 60) -> np.ndarray:
    return simulate_movie(frames=frames, height=32, width=32, seed=0)[0].data


def _tiff(path: Path, data: np.ndarray) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data)
    return path


def _prepare_case(tmp: Path, source: list[str], match: list[str], extra_guard: list[Path] | None = None) -> Case:
    out = tmp / "out"
    return Case("prepare_data", [*source, *PREPARE, f"out={out}"], DataError, match, [out, *(extra_guard or [])])


def case_truncated_tiff(tmp: Path, env: Env) -> Case:
    """A 60-frame TIFF cut to half its bytes."""
    full = _tiff(tmp / "full.tif", _movie())
    path = tmp / "trunc.tif"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return _prepare_case(tmp, ["source=tiff", f"source.path={path}"],
                         [re.escape(str(path)), "truncated", "expected a complete multi-page TIFF"])


def case_tiff_2d_image(tmp: Path, env: Env) -> Case:
    """A TIFF holding one 2D frame instead of a movie."""
    path = _tiff(tmp / "image.tif", _movie()[0])
    return _prepare_case(tmp, ["source=tiff", f"source.path={path}"],
                         [re.escape(str(path)), "single 2D image", r"expected a movie \[T, H, W\]"])


def _nonfinite_case(tmp: Path, value: float) -> Case:
    data = _movie().astype(np.float32)
    data[30, 3, 3] = value  # frame 30: outside the calibration windows, found while tiling after shards exist
    path = _tiff(tmp / "float.tif", data)
    return _prepare_case(tmp, ["source=tiff", f"source.path={path}"],
                         [re.escape(str(path)), "frame 30 contains NaN/Inf", "expected finite intensities"])


def case_float_movie_nan(tmp: Path, env: Env) -> Case:
    """A float32 TIFF movie with one NaN pixel in frame 30."""
    return _nonfinite_case(tmp, np.nan)


def case_float_movie_inf(tmp: Path, env: Env) -> Case:
    """A float32 TIFF movie with one +Inf pixel in frame 30."""
    return _nonfinite_case(tmp, np.inf)


def case_empty_folder(tmp: Path, env: Env) -> Case:
    """source.path is an empty folder."""
    folder = tmp / "empty"
    folder.mkdir()
    return _prepare_case(tmp, ["source=tiff", f"source.path={folder}"],
                         [re.escape(str(folder)), r"no \.tif/\.tiff files", "expected a TIFF movie"])


def case_zip_path_traversal(tmp: Path, env: Env) -> Case:
    """A cached Neurofinder zip with a '../evil.txt' member."""
    cache = tmp / "cache"
    cache.mkdir()
    archive = cache / "neurofinder.00.00.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("neurofinder.00.00/info.json", json.dumps({"rate-hz": 7.0}))
        zf.writestr("neurofinder.00.00/images/image00000.tiff", b"")
        zf.writestr("../evil.txt", "escaped")
    base_url = "http://127.0.0.1:9"  # nothing listens: the archive must come from the cache
    # already downloaded: its first download recorded size and sha256, so fetch() verifies it and skips the network
    record_download(archive, archive.stat().st_size, hashlib.sha256(archive.read_bytes()).hexdigest(),
                    f"{base_url}/{archive.name}")
    source = ["source=neurofinder", "source.ids=[00.00]", f"source.cache_dir={cache}", f"source.base_url={base_url}"]
    return _prepare_case(tmp, source, [re.escape(str(archive)), r"unsafe member path '\.\./evil\.txt'", r"absolute or '\.\.'"],
                         extra_guard=[tmp / "evil.txt", cache / "neurofinder.00.00"])


def case_hdf5_missing_key(tmp: Path, env: Env) -> Case:
    """An HDF5 file whose movie is under 'frames', read with source.key=data."""
    import h5py

    path = tmp / "movie.h5"
    with h5py.File(path, "w") as fh:
        fh["frames"] = _movie()
    return _prepare_case(tmp, ["source=hdf5", f"source.path={path}", "source.key=data"],
                         [re.escape(str(path)), "no dataset 'data'", r"set source\.key", r"\['frames'\]"])


def case_movie_shorter_than_clip(tmp: Path, env: Env) -> Case:
    """A 10-frame movie with 17-frame clips."""
    path = _tiff(tmp / "short.tif", _movie()[:10])
    return _prepare_case(tmp, ["source=tiff", f"source.path={path}"],
                         [re.escape(str(path)), r"\(10, 32, 32\) is smaller than one clip 17x32x32"])


def _train_args(tmp: Path, env: Env, *extra: str, data_root: Path | None = None) -> list[str]:
    return [*TRAIN_SINGLE, f"data.root={data_root or env.data_root}", f"out_root={tmp / 'runs'}", "run_name=bad", *extra]


def case_crop_not_causal(tmp: Path, env: Env) -> Case:
    """data.crop_frames=16 for a causal model with temporal_downsample=4."""
    return Case("train_ae", _train_args(tmp, env, "data.crop_frames=16"), ConfigError,
                [r"data\.crop_frames", "= 16", r"expected 1 \+ k\*4"], [tmp / "runs"])


def case_stored_clip_not_causal(tmp: Path, env: Env) -> Case:
    """Shards of 16-frame clips (not 1 + k*4) and no crop."""
    # the shared fixture's tiny simulator settings, but 16-frame clips (not 1 + k*4)
    root = tmp / "data16"
    keep = [o for o in SIM_DATA_OVERRIDES if not o.startswith("clip.frames")]
    prepare_data(compose("prepare_data", [*keep, "clip.frames=16", f"out={root}"]))
    return Case("train_ae", _train_args(tmp, env, "data.crop_frames=null", data_root=root), ConfigError,
                [re.escape(f"{root}/index.json clip.frames"), "= 16", r"expected 1 \+ k\*4"], [tmp / "runs"])


def case_noise_skip_on_photon_data(tmp: Path, env: Env) -> Case:
    """model.noise_skip=true for the flow-form decoder on photon-normalized shards (noise not homoscedastic)."""
    root = tmp / "photon"
    prepare_data(compose("prepare_data", [*SIM_DATA_OVERRIDES, "normalization.kind=photon", f"out={root}"]))
    return Case("train_ae", _train_args(tmp, env, "model.decoder_form=flow", "model.noise_skip=true", data_root=root),
                ConfigError,
                [r"model\.noise_skip=true", "normalization.kind='photon'", "anscombe"], [tmp / "runs"])


def _rewrite_val_shard(tmp: Path, env: Env, convert: Callable[[np.ndarray], np.ndarray]) -> tuple[Path, Path]:
    """Copy the data root and rewrite its first val shard with converted arrays (read before the first step)."""
    root = tmp / "data"
    shutil.copytree(env.data_root, root)
    shard = root / "val" / "clips-000000.tar"
    samples = list(iter_shard(shard))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, array, meta in samples:
            for name, payload in ((f"{key}.clip.npy", _npy(convert(array))), (f"{key}.meta.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return root, shard


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def case_shard_wrong_dtype(tmp: Path, env: Env) -> Case:
    """A val shard whose clips are float32 instead of uint16."""
    root, shard = _rewrite_val_shard(tmp, env, lambda a: a.astype(np.float32))
    run = tmp / "runs" / "train_ae" / "bad"
    return Case("train_ae", _train_args(tmp, env, data_root=root), DataError,
                [re.escape(str(shard)), "dtype float32", r"expected one of \('uint16', 'int16'\)"],
                [run / "export", run / "checkpoints" / "step_00000004"])


def case_shard_wrong_shape(tmp: Path, env: Env) -> Case:
    """A val shard whose clips are 17x16x16 while index.json says 17x32x32."""
    root, shard = _rewrite_val_shard(tmp, env, lambda a: np.ascontiguousarray(a[:, :16, :16]))
    run = tmp / "runs" / "train_ae" / "bad"
    return Case("train_ae", _train_args(tmp, env, data_root=root), DataError,
                [re.escape(str(shard)), r"shape \(17, 16, 16\)", r"expected \(17, 32, 32\) from index\.json"],
                [run / "export", run / "checkpoints" / "step_00000004"])


def case_typo_config_key(tmp: Path, env: Env) -> Case:
    """trainer.max_stpes=3 (typo)."""
    return Case("train_ae", _train_args(tmp, env, "trainer.max_stpes=3"), ConfigError,
                [r"trainer\.max_stpes", r"did you mean 'trainer\.max_steps'"], [tmp / "runs"])


def case_wrong_type(tmp: Path, env: Env) -> Case:
    """trainer.max_steps=ten (a string for an integer)."""
    return Case("train_ae", _train_args(tmp, env, "trainer.max_steps=ten"), ConfigError,
                [r"trainer\.max_steps", "'ten'", "could not be converted to Integer"], [tmp / "runs"])


def case_negative_lr(tmp: Path, env: Env) -> Case:
    """trainer.lr=-0.001."""
    return Case("train_ae", _train_args(tmp, env, "trainer.lr=-0.001"), ConfigError,
                [r"trainer\.lr", "-0.001", "expected a positive learning rate"], [tmp / "runs"])


def case_missing_checkpoint(tmp: Path, env: Env) -> Case:
    """sample mode=reconstruct with stage1 pointing at a run that does not exist."""
    missing = tmp / "runs" / "train_ae" / "never_trained"
    out = tmp / "recon"
    return Case("sample", ["mode=reconstruct", f"stage1={missing}", f"data.root={env.data_root}", f"out={out}",
                           "num_samples=2", "decoder_steps=2"], CheckpointError,
                [re.escape(f"stage1='{missing}'"), "no model export found", "expected a finished training run folder"],
                [out])


def case_sample_bad_decoder_grid(tmp: Path, env: Env) -> Case:
    """sample mode=reconstruct with decoder_grid=rho:0 (a time grid needs rho > 0)."""
    out = tmp / "recon"
    return Case("sample", ["mode=reconstruct", f"stage1={env.stage1_run}", f"data.root={env.data_root}", f"out={out}",
                           "num_samples=2", "decoder_grid=rho:0"], ConfigError,
                ["'decoder_grid'", "'rho:0'", re.escape("expected 'uniform', 'shift:S' (S > 0) or 'rho:R' (R > 0)")],
                [out])


def _resumed_run(tmp: Path, env: Env, *extra: str) -> tuple[Path, list[str]]:
    """A copy of the finished 3-step stage-1 run (checkpoint step_00000003) and the arguments resuming it."""
    out_root = tmp / "runs"
    run = out_root / "train_ae" / env.stage1_run.name
    shutil.copytree(env.stage1_run, run)
    return run, [*TRAIN_SINGLE, f"data.root={env.data_root}", f"out_root={out_root}", f"run_name={run.name}",
                 "trainer.max_steps=6", *extra]


def case_checkpoint_other_model_config(tmp: Path, env: Env) -> Case:
    """Resuming a run's checkpoints with model.z_channels=8 instead of 4."""
    run, args = _resumed_run(tmp, env, "model.z_channels=8")
    return Case("train_ae", args, ConfigError,
                [re.escape(str(run)), "model.z_channels: run has 4, now 8", "new run_name"], [run])


def case_resume_with_another_lr(tmp: Path, env: Env) -> Case:
    """Resuming a run's checkpoints with trainer.lr=0.5 and another seed: the whole config is compared."""
    run, args = _resumed_run(tmp, env, "trainer.lr=0.5", "seed=3")
    return Case("train_ae", args, ConfigError,
                [re.escape(str(run)), r"trainer\.lr: run has 0\.001, now 0\.5", "seed: run has 0, now 3",
                 "only trainer.max_steps, trainer.stop_at_step"], [run])


def case_resume_from_missing_step(tmp: Path, env: Env) -> Case:
    """trainer.resume_from=5 on a run whose only checkpoint is step 3."""
    run, args = _resumed_run(tmp, env, "trainer.resume_from=5")
    return Case("train_ae", args, CheckpointError,
                [r"trainer\.resume_from=5", re.escape(str(run / "checkpoints" / "step_00000005")),
                 "this run has step_00000003"], [run])


def case_resume_from_damaged_checkpoint(tmp: Path, env: Env) -> Case:
    """trainer.resume_from=3 after 4 KiB inside a tensor of its model.pt were zeroed (same size)."""
    run, args = _resumed_run(tmp, env, "trainer.resume_from=3")
    corrupt_checkpoint_file(run / "checkpoints" / "step_00000003" / "model.pt", "tensor_data")
    return Case("train_ae", args, CheckpointError,
                [r"trainer\.resume_from=3", re.escape(str(run / "checkpoints" / "step_00000003")),
                 "model.pt fails its sha256 check", "expected a complete, intact checkpoint folder"], [run])


def case_missing_data_root(tmp: Path, env: Env) -> Case:
    """train_ae with a mistyped data.root: an error, never simulated data trained on."""
    missing = tmp / "dta" / "sim"
    return Case("train_ae", [*TRAIN_SINGLE, f"data.root={missing}", f"out_root={tmp / 'runs'}", "run_name=r"],
                DataError, [re.escape(f"data.root '{missing}'"), "no index.json", "prepare_data"], [missing, tmp / "runs"])


def _latent_root(tmp: Path, stage1: Path) -> Path:
    root = tmp / "latents"
    rng = np.random.default_rng(0)
    samples = [(f"z{i:02d}", rng.standard_normal((4, 5, 4, 4)).astype(np.float32), {"source": "sim-000"}) for i in range(8)]
    train = write_shards(samples[:6], root, "train", "latents-train", clips_per_shard=4)
    val = write_shards(samples[6:], root, "val", "latents-val", clips_per_shard=4)
    write_index(root, {"kind": "latents", "latent_shape": [4, 5, 4, 4], "dtype": "float32",
                       "splits": {"train": {"shards": train, "num_clips": 6}, "val": {"shards": val, "num_clips": 2}},
                       "channel_mean": [0.0] * 4, "channel_std": [1.0] * 4, "stage1": str(stage1), "sources": {}})
    return root


def case_stage2_training_missing_stage1(tmp: Path, env: Env) -> Case:
    """train_latent on latents whose recorded stage-1 export was deleted."""
    gone = tmp / "deleted_run" / "export" / "model.pt"
    latents = _latent_root(tmp, gone)
    args = ["experiment=dit_tiny", "strategy=single", "trainer.num_workers=1", "trainer.max_steps=2",
            f"latents.root={latents}", f"out_root={tmp / 'runs'}", "run_name=d1"]
    return Case("train_latent", args, CheckpointError,
                [re.escape(str(latents)), re.escape(f"stage-1 export '{gone}'"), "does not exist",
                 "expected the train_ae export"], [tmp / "runs"])


def case_sample_missing_stage1(tmp: Path, env: Env) -> Case:
    """sample with a stage-2 export whose recorded stage-1 run was deleted."""
    gone = tmp / "deleted_run"
    dit = build_model({"kind": "dit", "size": "tiny", "in_channels": 4})
    stage2 = export_model(tmp / "stage2" / "export" / "model.pt", dit.state_dict(), dit.model_config,
                          {"stage": "latent", "step": 1, "data": {"stage1": str(gone), "sample_shape": [4, 5, 4, 4],
                                                                  "channel_mean": [0.0] * 4, "channel_std": [1.0] * 4}})
    out = tmp / "samples"
    return Case("sample", [f"stage2={stage2.parents[1]}", "num_samples=1", f"out={out}"], CheckpointError,
                [re.escape(f"stage1='{gone}'"), "no model export found", "expected a finished training run folder"],
                [out])


def case_sample_out_is_a_foreign_folder(tmp: Path, env: Env) -> Case:
    """sample out= a folder the user keeps other files in (here: a copy of prepared data with notes)."""
    out = tmp / "mydata"
    shutil.copytree(env.data_root, out)
    (out / "NOTES.txt").write_text("my notes\n")
    args = ["mode=reconstruct", f"stage1={env.stage1_run}", f"data.root={env.data_root}", "num_samples=1", f"out={out}"]
    return Case("sample", args, ConfigError,
                [re.escape(f"out '{out}'"), "holds the output of cadiff prepare_data, not sample", "nothing was changed"],
                [out])


def case_sample_out_is_a_file(tmp: Path, env: Env) -> Case:
    """sample out= an existing file."""
    out = tmp / "results.csv"
    out.write_text("a,b\n1,2\n")
    args = ["mode=reconstruct", f"stage1={env.stage1_run}", f"data.root={env.data_root}", "num_samples=1", f"out={out}"]
    return Case("sample", args, ConfigError, [re.escape(f"out '{out}'"), "is a file", "nothing was changed"],
                [out, tmp / f".{out.name}.old"])


def case_encode_out_is_the_data_root(tmp: Path, env: Env) -> Case:
    """encode_latents out= the clip shards it reads (would replace the clips with latents)."""
    data = tmp / "data"
    shutil.copytree(env.data_root, data)
    return Case("encode_latents", [f"stage1={env.stage1_run}", f"data.root={data}", f"out={data}"], ConfigError,
                [re.escape(f"out '{data}'"), "holds the output of cadiff prepare_data, not encode_latents"], [data])


def case_prepare_out_is_a_foreign_folder(tmp: Path, env: Env) -> Case:
    """prepare_data out= a folder of the user's own files, even with overwrite=true."""
    out = tmp / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text("my notes\n")
    path = _tiff(tmp / "movie.tif", _movie())
    return Case("prepare_data", ["source=tiff", f"source.path={path}", *PREPARE, f"out={out}", "overwrite=true"],
                ConfigError, [re.escape(f"out '{out}'"), "non-empty folder that no cadiff prepare_data run wrote",
                              "nothing was changed"], [out])


def case_prepare_other_settings_without_overwrite(tmp: Path, env: Env) -> Case:
    """prepare_data into a complete preparation with clips_per_shard=8 instead of its 4."""
    out = tmp / "data"
    shutil.copytree(env.data_root, out)
    return Case("prepare_data", [*SIM_DATA_OVERRIDES, "clips_per_shard=8", f"out={out}"], ConfigError,
                [re.escape(f"out '{out}'"), r"prepared from other settings or inputs \(clips_per_shard: 4 -> 8\)",
                 "pass overwrite=true", "nothing was changed"], [out])


def case_prepare_overwrite_with_a_bad_input(tmp: Path, env: Env) -> Case:
    """overwrite=true over a complete preparation while the changed movie has a NaN in frame 30 (found while
    tiling, after shards were written): the earlier data must survive."""
    path, out = tmp / "float.tif", tmp / "out"
    _tiff(path, _movie().astype(np.float32))
    prepare_data(compose("prepare_data", ["source=tiff", f"source.path={path}", *PREPARE, f"out={out}"]))
    case = _nonfinite_case(tmp, np.nan)
    case.args.append("overwrite=true")
    return case


def case_prepare_all_negative_float_movie(tmp: Path, env: Env) -> Case:
    """A float32 TIFF whose values are all negative (processed data): 100% would be clipped to 0."""
    path = _tiff(tmp / "negative.tif", _movie().astype(np.float32) - 70000)
    return _prepare_case(tmp, ["source=tiff", f"source.path={path}"],
                         [re.escape(str(path)), r"100\.00% of the values .* would be clipped",
                          r"at most 0\.1%", "expected raw detector ADU"])


def case_prepare_constant_movie(tmp: Path, env: Env) -> Case:
    """A uint16 movie whose every value is 100 (zero variance), with gain and offset given."""
    path = _tiff(tmp / "flat.tif", np.full((60, 32, 32), 100, dtype=np.uint16))
    return _prepare_case(tmp, ["source=tiff", f"source.path={path}", "source.gain=2", "source.offset=90"],
                         [re.escape(str(path)), r"every value is 100 \(zero variance\)", "expected a movie with signal"])


def _declared_hdf5(path: Path, shape: tuple[int, int, int]) -> Path:
    import h5py

    with h5py.File(path, "w") as fh:  # declared, never written: a few KB on disk
        fh.create_dataset("data", shape=shape, dtype="uint16", chunks=(1, 256, 256))
    return path


def case_prepare_hdf5_larger_than_the_disk(tmp: Path, env: Env) -> Case:
    """An HDF5 file declaring a (1e7, 4096, 4096) uint16 movie: hundreds of TiB of clips."""
    path = _declared_hdf5(tmp / "huge.h5", (10_000_000, 4096, 4096))
    return _prepare_case(tmp, ["source=hdf5", f"source.path={path}", "source.key=data"],
                         [re.escape(str(tmp / "out")), r"needs about [\d.]+ TiB on disk", re.escape(f"from {path}:data"),
                          "are free there", "expected an out with room for it"])


def case_prepare_hdf5_frames_larger_than_memory(tmp: Path, env: Env) -> Case:
    """An HDF5 file declaring 100000x100000 frames: one chunk of frames cannot fit in memory."""
    path = _declared_hdf5(tmp / "wide.h5", (20, 100_000, 100_000))
    return _prepare_case(tmp, ["source=hdf5", f"source.path={path}", "source.key=data"],
                         [re.escape(f"{path}:data"), r"needs about [\d.]+ TiB of memory", "are available",
                          "expected frames that fit in memory"])


def case_processed_movie_photon_transfer(tmp: Path, env: Env) -> Case:
    """source.calibration=photon_transfer on a processed float movie (log-scaled: negative photon-transfer slope)."""
    path = _tiff(tmp / "processed.tif", log_scaled_movie(frames=60, size=32))
    out = tmp / "out"
    args = ["source=tiff", f"source.path={path}", "source.calibration=photon_transfer", *PREPARE, f"out={out}"]
    return Case("prepare_data", args, NoPhotonSignature,
                [re.escape(str(path)), "photon-transfer slope .* is not positive",
                 r"pass source\.gain and source\.offset", r"or source\.calibration=none"], [out])


CASES: dict[str, Callable[[Path, Env], Case]] = {
    "truncated_tiff": case_truncated_tiff,
    "tiff_2d_image": case_tiff_2d_image,
    "float_movie_nan": case_float_movie_nan,
    "float_movie_inf": case_float_movie_inf,
    "empty_folder": case_empty_folder,
    "zip_path_traversal": case_zip_path_traversal,
    "hdf5_missing_key": case_hdf5_missing_key,
    "movie_shorter_than_clip": case_movie_shorter_than_clip,
    "crop_not_causal": case_crop_not_causal,
    "stored_clip_not_causal": case_stored_clip_not_causal,
    "noise_skip_on_photon_data": case_noise_skip_on_photon_data,
    "shard_wrong_dtype": case_shard_wrong_dtype,
    "shard_wrong_shape": case_shard_wrong_shape,
    "typo_config_key": case_typo_config_key,
    "wrong_type": case_wrong_type,
    "negative_lr": case_negative_lr,
    "missing_checkpoint": case_missing_checkpoint,
    "sample_bad_decoder_grid": case_sample_bad_decoder_grid,
    "checkpoint_other_model_config": case_checkpoint_other_model_config,
    "resume_with_another_lr": case_resume_with_another_lr,
    "resume_from_missing_step": case_resume_from_missing_step,
    "resume_from_damaged_checkpoint": case_resume_from_damaged_checkpoint,
    "missing_data_root": case_missing_data_root,
    "stage2_training_missing_stage1": case_stage2_training_missing_stage1,
    "sample_missing_stage1": case_sample_missing_stage1,
    "sample_out_is_a_foreign_folder": case_sample_out_is_a_foreign_folder,
    "sample_out_is_a_file": case_sample_out_is_a_file,
    "encode_out_is_the_data_root": case_encode_out_is_the_data_root,
    "prepare_out_is_a_foreign_folder": case_prepare_out_is_a_foreign_folder,
    "prepare_other_settings_without_overwrite": case_prepare_other_settings_without_overwrite,
    "prepare_overwrite_with_a_bad_input": case_prepare_overwrite_with_a_bad_input,
    "prepare_all_negative_float_movie": case_prepare_all_negative_float_movie,
    "prepare_constant_movie": case_prepare_constant_movie,
    "prepare_hdf5_larger_than_the_disk": case_prepare_hdf5_larger_than_the_disk,
    "prepare_hdf5_frames_larger_than_memory": case_prepare_hdf5_frames_larger_than_memory,
    "processed_movie_photon_transfer": case_processed_movie_photon_transfer,
}


# ---------------------------------------------------------------------------------------------------------
# running a case


def run_in_process(case: Case) -> CadiffError:
    """Compose and run the job in this process; return the error it raised (AssertionError if none)."""
    try:
        JOBS[case.job](compose(case.job, case.args), case.args)
    except CadiffError as exc:
        return exc
    raise AssertionError(f"{case.job} {case.args} did not fail")


def run_entry_point(case: Case) -> subprocess.CompletedProcess:
    """The case's job through its entry point in this process (:func:`cadiff.testing.run_job_in_process`)."""
    return run_job_in_process(case.job, list(case.args))


def run_cli(case: Case, cwd: Path, verbose: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, str(REPO / "jobs" / f"{case.job}.py"), *case.args, *(["--verbose"] if verbose else [])]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check_message(case: Case, message: str) -> list[str]:
    """Regexes of ``case.match`` missing from ``message`` (empty when the message is complete)."""
    return [m for m in case.match if not re.search(m, message)]


def check_cli(case: Case, result: subprocess.CompletedProcess) -> list[str]:
    """Contract violations of a failed job run (empty list when it behaved)."""
    problems = []
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    prefix = f"cadiff {case.job}: error:"
    if result.returncode != 2:
        problems.append(f"exit code {result.returncode}, expected 2")
    if len(lines) != 1 or not lines[0].startswith(prefix):
        problems.append(f"stdout is not one '{prefix}' line: {lines[-3:]}")
    if "Traceback" in result.stdout + result.stderr:
        problems.append("a traceback was printed without --verbose")
    problems += [f"message lacks /{m}/" for m in check_message(case, lines[-1] if lines else "")]
    return problems
