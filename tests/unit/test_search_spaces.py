"""Search spaces: the shipped YAML files load and compose, malformed ones fail before any trial, conversion
to Ray Tune / Optuna domains, and sampled values turned into Hydra overrides that compose."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cadiff.config import JOB_SCHEMAS, compose, schema_fields, validate_clip_for_model
from cadiff.errors import ConfigError
from cadiff.tune.space import (
    Param,
    SearchSpace,
    apply_params,
    available_spaces,
    format_value,
    load_space,
    repo_root,
    to_tune,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [("noise_schedule", "ae"), ("noise_schedule", "latent"), ("latent_size", "ae"), ("dit_width", "latent")]


@pytest.fixture(scope="module")
def spaces() -> dict[tuple[str, str], SearchSpace]:
    return {(name, stage): load_space(name, stage) for name, stage in SHIPPED}


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# shipped spaces


def test_repo_root_holds_the_shipped_spaces():
    assert repo_root() == REPO
    assert {"noise_schedule", "latent_size", "dit_width"} <= set(available_spaces())


@pytest.mark.parametrize("name,stage", SHIPPED)
def test_shipped_space_keys_are_schema_keys(spaces, name, stage):
    space = spaces[(name, stage)]
    assert space.job == {"ae": "train_ae", "latent": "train_latent"}[stage]
    assert space.experiment == {"ae": "ae_tiny", "latent": "dit_tiny"}[stage]
    assert set(space.params) <= set(schema_fields(JOB_SCHEMAS[space.job]))
    assert space.path == REPO / "search_spaces" / f"{name}.yaml"


@pytest.mark.parametrize("name,stage", SHIPPED)
def test_sampled_trials_compose(spaces, name, stage):
    """Three random draws from the Tune domains give Hydra overrides that compose into the sampled values."""
    space = spaces[(name, stage)]
    domains = to_tune(space)
    rng = np.random.default_rng(0)
    for _ in range(3):
        sampled = {k: d.sample(random_state=rng) for k, d in domains.items()}
        cfg = compose(space.job, space.trial_overrides(sampled))
        for key, value in sampled.items():
            got = cfg
            for part in key.split("."):
                got = getattr(got, part)
            got = list(got) if isinstance(value, list) else got
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


def test_noise_schedule_covers_flow_samplers_and_ddpm_schedules(spaces):
    params = spaces[("noise_schedule", "ae")].params
    assert set(params["model.diffusion.objective"].args) == {"flow", "ddpm"}
    assert set(params["model.diffusion.time_sampler"].args) == {"uniform", "logit_normal"}
    assert set(params["model.diffusion.ddpm_schedule"].args) == {"linear", "cosine"}
    assert params["model.diffusion.logit_std"].dist == "uniform"
    assert params["model.diffusion.shift"].dist == "loguniform" and params["model.diffusion.shift"].args[0] >= 1.0


def test_latent_size_choices_fit_the_tiny_crops(spaces):
    """Every z/spatial/temporal combination is a valid causal model for ae_tiny's 17x32x32 crops."""
    space = spaces[("latent_size", "ae")]
    keys = list(space.params)
    combos = list(itertools.product(*(space.params[k].candidates() for k in keys)))
    assert len(combos) == 12
    for combo in random.Random(0).sample(combos, 4):  # each compose costs ~0.1 s; the loader checks them all
        cfg = compose("train_ae", space.trial_overrides(dict(zip(keys, combo))))
        validate_clip_for_model(cfg.data.crop_frames, cfg.data.crop_height, cfg.data.crop_width, cfg.model, "data")


def test_dit_width_heads_divide_hidden_into_rope_friendly_head_dims(spaces):
    params = spaces[("dit_width", "latent")].params
    for hidden, heads in itertools.product(params["model.hidden_size"].args, params["model.num_heads"].args):
        assert hidden % heads == 0 and (hidden // heads) % 6 == 0, (hidden, heads)
    assert params["model.depth"].dist == "int"


# ---------------------------------------------------------------------------------------------------------
# malformed spaces fail before any trial, naming the file and the key

BAD_SPACES = [
    ("stage: ae\nparams:\n  trainer.lr: {normal: [0.0, 1.0]}\n", "unknown distribution 'normal'", "trainer.lr"),
    ("stage: ae\nparams:\n  model.not_a_key: {choice: [1, 2]}\n", "not a config key of train_ae", "model.not_a_key"),
    ("stage: ae\nparams:\n  trainer.lr: {uniform: [0.2, 0.1]}\n", "low 0.2 >= high 0.1", "trainer.lr"),
    ("stage: ae\nparams:\n  model.z_channels: {int: [8, 4]}\n", "low 8 > high 4", "model.z_channels"),
    ("stage: ae\nparams:\n  trainer.lr: {loguniform: [0.0, 1.0]}\n", "must be > 0", "trainer.lr"),
    ("stage: ae\nparams:\n  model.z_channels: {choice: []}\n", "non-empty list", "model.z_channels"),
    ("stage: ae\nparams:\n  model.z_channels: {int: [1.5, 4]}\n", "integer bounds", "model.z_channels"),
    ("stage: ae\nparams:\n  model.z_channels: [4, 8]\n", "exactly one distribution", "model.z_channels"),
    ("stage: ae\nparams:\n  trainer.lr: {uniform: [0.1, 0.2], choice: [1]}\n", "exactly one", "trainer.lr"),
    ("stage: ae\nparams:\n  trainer.lr: {uniform: [0.1, high]}\n", "two finite numbers", "trainer.lr"),
    ("stage: ae\nparms:\n  trainer.lr: {uniform: [0.1, 0.2]}\n", "unknown top-level key", "parms"),
    ("stage: ae\nparams: {}\n", "non-empty mapping", "params"),
    ("params:\n  trainer.lr: {uniform: [0.1, 0.2]}\n", "stage None", "stage"),
    ("stage: [ae, vae]\nparams:\n  trainer.lr: {uniform: [0.1, 0.2]}\n", "expected 'ae', 'latent'", "stage"),
    ("- just\n- a list\n", "expected a mapping", "stage"),
    ("stage: ae\nparams: {trainer.lr: {uniform: [0.1, 0.2]\n", "not valid YAML", ""),
]


@pytest.mark.parametrize("text,message,key", BAD_SPACES)
def test_malformed_space_fails_naming_file_and_key(tmp_path, text, message, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path, "ae", check_compose=False)
    msg = str(info.value)
    assert str(path) in msg and message in msg and key in msg


@pytest.mark.parametrize("name,stage", [("latent_size", "latent"), ("dit_width", "ae")])
def test_wrong_stage_fails(name, stage):
    with pytest.raises(ConfigError, match=rf"{name}\.yaml: space is for stage .*not stage '{stage}'"):
        load_space(name, stage)


def test_unknown_space_and_stage_fail():
    with pytest.raises(ConfigError, match="no search_spaces/nope.yaml"):
        load_space("nope", "ae")
    with pytest.raises(ConfigError, match="no such file"):
        load_space("missing/space.yaml", "ae")
    with pytest.raises(ConfigError, match="stage 'vae'"):
        load_space("latent_size", "vae")


# a space every value (or combination) of which is checked against the stage's schema before any trial
REJECTED_SPACES = {
    "key_of_the_other_stage": ("latent", "model.z_channels: {choice: [4, 8]}",
                               r"params key 'model.z_channels' is not a config key of train_latent"),
    "value_that_does_not_compose": ("ae", "model.temporal_downsample: {choice: [2, 3]}",
                                    r"params.model.temporal_downsample value 3 is invalid.*power of 2"),
    "value_of_the_wrong_type": ("ae", "model.z_channels: {choice: [4, many]}",
                                r"params.model.z_channels value 'many' is invalid"),
    # 18 frames is not 1 + k * temporal_downsample
    "crop_incompatible_value": ("ae", "data.crop_frames: {choice: [17, 18]}",
                                r"params.data.crop_frames value 18 .*1 \+ k\*4"),
    # each value composes alone; temporal 8 with spatial 4 breaks spatial >= temporal
    "jointly_impossible_combination": (
        "ae", "model.temporal_downsample: {choice: [2, 8]}\n  model.spatial_downsample: {choice: [8, 4]}",
        r"the combination .*'model.temporal_downsample': 8.*'model.spatial_downsample': 4"),
    "hidden_not_divisible_by_heads": ("latent", "model.hidden_size: {choice: [36, 96]}\n  model.num_heads: {choice: [8]}",
                                      r"combination .*divisible by num_heads=8"),
}


@pytest.mark.parametrize("case", list(REJECTED_SPACES))
def test_space_that_cannot_compose_fails_naming_key_and_value(tmp_path, case):
    stage, params, message = REJECTED_SPACES[case]
    path = _write(tmp_path, f"stage: {stage}\nparams:\n  {params}\n")
    with pytest.raises(ConfigError, match=message):
        load_space(path, stage)


def test_base_overrides_take_part_in_the_check():
    """latent_size is valid for 17-frame crops, but temporal_downsample=4 cannot tile 11 = 1 + 10 frames."""
    load_space("latent_size", "ae", overrides=["data.crop_frames=9"])
    with pytest.raises(ConfigError, match=r"model.temporal_downsample value 4 .*data.crop_frames"):
        load_space("latent_size", "ae", overrides=["data.crop_frames=11", "model.temporal_downsample=2"])


def test_bad_base_experiment_fails():
    with pytest.raises(ConfigError, match="base config train_ae"):
        load_space("latent_size", "ae", experiment="no_such_experiment")


def test_exponent_floats_and_explicit_paths(tmp_path, monkeypatch):
    """1e-4 (no dot) is a float here although YAML 1.1 reads it as a string; names resolve in the cwd too."""
    (tmp_path / "search_spaces").mkdir()
    _write(tmp_path / "search_spaces", "stage: ae\nparams:\n  trainer.lr: {loguniform: [1e-4, 3e-3]}\n", "lr_only.yaml")
    monkeypatch.chdir(tmp_path)
    space = load_space("lr_only", "ae")
    assert space.params["trainer.lr"] == Param("trainer.lr", "loguniform", (1e-4, 3e-3))
    assert load_space(tmp_path / "search_spaces" / "lr_only.yaml", "ae").params == space.params


# ---------------------------------------------------------------------------------------------------------
# conversion to Tune / Optuna


@pytest.fixture()
def mixed_space(tmp_path) -> SearchSpace:
    path = _write(
        tmp_path,
        """stage: latent
params:
  model.hidden_size: {grid: [48, 96]}
  model.num_heads: {choice: [2, 4]}
  model.depth: {int: [2, 4]}
  model.diffusion.logit_std: {uniform: [0.5, 1.5]}
  trainer.lr: {loguniform: [1.0e-4, 1.0e-2]}
""",
    )
    return load_space(path, "latent")


def test_to_tune_domains(mixed_space):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = to_tune(mixed_space)
    assert space["model.hidden_size"] == {"grid_search": [48, 96]}
    assert isinstance(space["model.num_heads"], Categorical) and space["model.num_heads"].categories == [2, 4]
    depth = space["model.depth"]
    # tune.randint excludes its upper bound; the YAML bound is inclusive
    assert isinstance(depth, Integer) and (depth.lower, depth.upper) == (2, 5)
    assert {depth.sample() for _ in range(200)} == {2, 3, 4}
    lr = space["trainer.lr"]
    assert isinstance(lr, Float) and type(lr.get_sampler()).__name__ == "_LogUniform"
    assert type(space["model.diffusion.logit_std"].get_sampler()).__name__ == "_Uniform"


def test_to_tune_grid_and_optuna_modes(mixed_space):
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical

    grid = to_tune(mixed_space, search="grid")
    assert grid["model.num_heads"] == {"grid_search": [2, 4]}
    optuna_space = to_tune(mixed_space, search="optuna")  # no grid_search entries: OptunaSearch accepts it
    assert isinstance(optuna_space["model.hidden_size"], Categorical)
    converted = OptunaSearch.convert_search_space(optuna_space)
    assert set(converted) == set(mixed_space.params)
    with pytest.raises(ValueError):
        OptunaSearch.convert_search_space(to_tune(mixed_space))  # grid_search is not Optuna-compatible
    with pytest.raises(ConfigError, match="search 'bayes'"):
        to_tune(mixed_space, search="bayes")


# ---------------------------------------------------------------------------------------------------------
# Hydra overrides


def test_format_value_forms():
    assert format_value([1, 2, 2]) == "[1,2,2]"
    assert format_value((1, [2, 3])) == "[1,[2,3]]"
    assert format_value(np.float64(0.5)) == "0.5"
    assert format_value(np.int64(3)) == "3"
    assert format_value(np.bool_(True)) == "true"
    assert format_value(1e-5) == "1e-05"
    assert format_value(None) == "null"
    assert format_value("logit_normal") == "logit_normal"
    assert format_value("true") == "'true'"
    assert format_value("a b") == "'a b'"
    for bad in (float("nan"), {"a": 1}, "${oc.env:HOME}"):
        with pytest.raises(ConfigError):
            format_value(bad)


def test_apply_params_replaces_and_appends():
    base = ["experiment=ae_tiny", "trainer.lr=0.1", "+model.z_channels=2", "trainer.max_steps=3"]
    out = apply_params(base, {"trainer.lr": 1e-5, "model.z_channels": np.int64(8), "model.diffusion.shift": 2.0})
    assert out == ["experiment=ae_tiny", "trainer.max_steps=3", "trainer.lr=1e-05", "model.z_channels=8", "model.diffusion.shift=2.0"]
    cfg = compose("train_ae", out)
    assert cfg.trainer.lr == 1e-5 and cfg.model.z_channels == 8 and cfg.trainer.max_steps == 3
    cfg = compose("train_latent", apply_params(["experiment=dit_tiny"], {"model.patch_size": [1, 1, 1]}))
    assert list(cfg.model.patch_size) == [1, 1, 1]


@settings(max_examples=12, deadline=None)
@given(st.text(alphabet="ab '\\\",=[]{}:/.-_$%1", min_size=1, max_size=12))
def test_string_values_round_trip_through_hydra(text):
    if "${" in text:
        return
    cfg = compose("train_ae", apply_params([], {"run_name": text}))
    assert cfg.run_name == text
