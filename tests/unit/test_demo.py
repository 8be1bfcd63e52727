"""``make demo`` plumbing: run names follow the composed configs, so a changed default never blocks a re-run."""

from __future__ import annotations

import sys
from pathlib import Path

from cadiff import demo


def _names(steps):
    return {job: next(o.split("=", 1)[1] for o in ov if o.startswith("run_name="))
            for job, ov in steps if job in ("train_ae", "train_latent")}


def test_run_names_are_stable_and_follow_the_configs(tmp_path: Path):
    steps = demo.demo_steps(tmp_path, 3, 3, 1, 2)
    names = _names(steps)
    assert names["train_ae"] == names["train_latent"] and names["train_ae"].startswith("demo-")
    assert _names(demo.demo_steps(tmp_path, 3, 3, 1, 2)) == names  # a re-run resumes the same runs
    assert _names(demo.demo_steps(tmp_path, 4, 3, 1, 2)) != names  # another config trains new runs
    by_job = dict(steps)
    assert by_job["encode_latents"][0] == f"stage1={tmp_path / 'runs'}/train_ae/{names['train_ae']}"
    assert by_job["sample"][0] == f"stage2={tmp_path / 'runs'}/train_latent/{names['train_latent']}"
    assert _names(demo.demo_steps(tmp_path, 3, 3, 1, 2, run_name="mine")) == {"train_ae": "mine", "train_latent": "mine"}


def test_each_stage_streams_its_progress_lines(capsys):
    script = ("import sys; print('noise'); print('12:00:01 INFO x: step 5/10 | loss 0.5000 | elapsed 1s ETA 1s', "
              "file=sys.stderr, flush=True); print('cadiff train_ae: ok step=10 -> out')")
    code, lines = demo._run_streaming([sys.executable, "-c", script])
    assert code == 0 and lines[-1] == "cadiff train_ae: ok step=10 -> out"
    out = capsys.readouterr().out
    assert "[demo]     step 5/10 | loss 0.5000 | elapsed 1s ETA 1s" in out and "noise" not in out


def test_demo_names_the_report_of_each_training_run_and_of_the_evaluation(tmp_path: Path):
    steps = demo.demo_steps(tmp_path, 3, 3, 1, 2, run_name="r")
    assert demo.report_paths(steps) == [
        ("train_ae", tmp_path / "runs" / "train_ae" / "r" / "report.html"),
        ("train_latent", tmp_path / "runs" / "train_latent" / "r" / "report.html"),
        ("evaluate", tmp_path / "eval" / "report.html"),
    ]


def test_demo_feeds_the_dit_enough_movies_split_by_movie_and_writes_a_long_movie(tmp_path: Path):
    from cadiff.config import compose

    steps = demo.demo_steps(tmp_path, 3, 3, 1, 2, run_name="r")
    prep = compose("prepare_data", dict(steps)["prepare_data"])
    val_movies = round(prep.val_fraction * prep.source.num_movies)
    train_clips = (prep.source.num_movies - val_movies) * (prep.source.frames // prep.clip.frames)
    assert val_movies >= 1 and train_clips >= 200  # the former demo: 3 movies x 11 clips = 33 latents
    long = [ov for job, ov in steps if job == "sample" and any(o.startswith("num_frames=") for o in ov)
            and not any(o.startswith("mask=") for o in ov)]
    assert len(long) == 1 and f"num_frames={demo.LONG_FRAMES}" in long[0] and demo.LONG_FRAMES >= 257
    assert compose("sample", long[0]).num_frames == demo.LONG_FRAMES  # a valid 1 + k*s_t override


def test_demo_trains_a_mask_conditioned_dit_and_samples_the_cells_of_an_unseen_movie(tmp_path: Path):
    from cadiff.config import compose

    steps = demo.demo_steps(tmp_path, 3, 3, 1, 2, run_name="r")
    jobs = [job for job, _ in steps]
    stage2 = compose("train_latent", dict(steps)["train_latent"])
    assert stage2.model.cond_mask and stage2.latents.mask_subgrid == 4  # the ROI map as 4x4 sub-block planes
    export = compose("export", dict(steps)["export"])
    assert export.source.seed >= compose("prepare_data", dict(steps)["prepare_data"]).source.num_movies  # unseen
    masked = [ov for job, ov in steps if job == "sample" and any(o.startswith("mask=") for o in ov)]
    assert len(masked) == 1 and jobs.index("export") < len(jobs) - 1 - jobs[::-1].index("sample")
    cfg = compose("sample", masked[0])
    assert cfg.mask == str(demo.mask_file(tmp_path)) and cfg.guidance_scale > 1 and cfg.num_frames >= 257
    assert str(demo.mask_file(tmp_path)).startswith(export.out)
    crop = compose("train_ae", dict(steps)["train_ae"]).data  # the mask has the samples' frame size
    assert (export.source.height, export.source.width) == (crop.crop_height, crop.crop_width)
