"""Tune search spaces as data: load ``search_spaces/<name>.yaml``, validate it before any trial, convert it.

A space file reads::

    stage: ae                      # or latent, or [ae, latent] when every key exists in both schemas
    description: optional text
    params:
      model.diffusion.time_sampler: {choice: [uniform, logit_normal]}
      model.diffusion.logit_std: {uniform: [0.5, 1.5]}
      trainer.lr: {loguniform: [1.0e-4, 3.0e-3]}
      model.depth: {int: [2, 6]}    # both ends inclusive
      model.z_channels: {grid: [4, 8]}

Keys are dotted config keys of the stage's job schema (``train_ae`` / ``train_latent``). ``load_space`` rejects
an unknown distribution, an unknown key, bad bounds, an empty choice or a wrong stage, then composes every
candidate value (choices and endpoints) with the job's Hydra config on top of the base experiment, and checks
that the combinations of candidates pass the job's validation, so an impossible value fails before Ray starts.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import cadiff
from cadiff.config import JOB_SCHEMAS, VALIDATORS, compose, schema_fields
from cadiff.errors import ConfigError
from cadiff.train.stage import STAGES

log = logging.getLogger(__name__)

STAGE_JOBS = {name: stage.job for name, stage in STAGES.items()}
DEFAULT_EXPERIMENTS = {"ae": "ae_tiny", "latent": "dit_tiny"}
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "int")
SEARCH_MODES = ("random", "grid", "optuna")
SPACES_DIR = "search_spaces"
_TOP_KEYS = {"stage", "params", "description"}
# Above this many candidate combinations the joint check looks at a seeded random subset of them.
MAX_JOINT_CHECKS = 512


@dataclass(frozen=True)
class Param:
    """One swept key: a distribution name and its arguments (values, or inclusive [low, high])."""

    key: str
    dist: str
    args: tuple

    def candidates(self) -> list[Any]:
        """Values that validation composes: every choice/grid value, or both endpoints of a range."""
        return list(self.args) if self.dist in ("choice", "grid") else [self.args[0], self.args[1]]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space bound to a stage, its job and the base experiment the trials start from."""

    name: str
    path: Path
    stage: str
    job: str
    experiment: str
    params: dict[str, Param]
    base_overrides: tuple[str, ...] = field(default_factory=tuple)

    def trial_overrides(self, sampled: Mapping[str, Any]) -> list[str]:
        """Hydra overrides of one trial: the base experiment and overrides, then the sampled values."""
        return apply_params([f"experiment={self.experiment}", *self.base_overrides], sampled)


# ---------------------------------------------------------------------------------------------------------
# loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float: YAML 1.1 demands a dot, search spaces should not."""


_FLOAT_RE = r"^[-+]?\d[\d_]*(?:\.[\d_]*)?[eE][-+]?\d+$"  # 1e-4, 3.0e3: exponent forms YAML 1.1 misses
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT_RE), list("-+0123456789"))


def repo_root() -> Path:
    """The folder holding ``search_spaces/``: the parent of the ``cadiff`` package, else the working directory."""
    package_parent = Path(cadiff.__file__).resolve().parent.parent
    if (package_parent / SPACES_DIR).is_dir():
        return package_parent
    return Path.cwd()


def available_spaces() -> list[str]:
    """Names of the search spaces shipped in ``search_spaces/``."""
    folder = repo_root() / SPACES_DIR
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_space_path(name_or_path: str | Path) -> Path:
    """``search_spaces/<name>.yaml`` under the repo root or the working directory, or an explicit file."""
    text = str(name_or_path)
    direct = Path(text).expanduser()
    if direct.suffix in (".yaml", ".yml") or "/" in text or direct.is_file():
        if direct.is_file():
            return direct.resolve()
        raise ConfigError(f"space '{text}': no such file (expected a YAML search space file)")
    for root in dict.fromkeys([repo_root(), Path.cwd()]):
        candidate = root / SPACES_DIR / f"{text}.yaml"
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"space '{text}': no {SPACES_DIR}/{text}.yaml under {repo_root()} or {Path.cwd()} "
        f"(expected one of {available_spaces()} or a path to a YAML file)"
    )


def load_space(
    name_or_path: str | Path,
    stage: str,
    experiment: str | None = None,
    overrides: Sequence[str] = (),
    check_compose: bool = True,
) -> SearchSpace:
    """Read and validate a search space for ``stage`` ("ae" or "latent"); raise ConfigError before any trial."""
    if stage not in STAGE_JOBS:
        raise ConfigError(f"stage '{stage}': expected one of {sorted(STAGE_JOBS)}")
    path = resolve_space_path(name_or_path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys 'stage' and 'params', got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; expected {sorted(_TOP_KEYS)}")
    _check_stage(path, raw.get("stage"), stage)
    job = STAGE_JOBS[stage]
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{path}: 'params' must be a non-empty mapping of config key -> {{distribution: args}}")
    known = set(schema_fields(JOB_SCHEMAS[job]))
    params = {}
    for key, spec in params_raw.items():
        if not isinstance(key, str) or key not in known:
            raise ConfigError(
                f"{path}: params key '{key}' is not a config key of {job} "
                f"(expected a dotted key of its schema, e.g. 'trainer.lr' or 'model.diffusion.shift')"
            )
        params[key] = _parse_param(path, key, spec)
    space = SearchSpace(
        name=path.stem,
        path=path,
        stage=stage,
        job=job,
        experiment=experiment or DEFAULT_EXPERIMENTS[stage],
        params=params,
        base_overrides=tuple(overrides),
    )
    if check_compose:
        check_space_composes(space)
    return space


def _check_stage(path: Path, declared: Any, stage: str) -> None:
    stages = declared if isinstance(declared, list) else [declared]
    bad = [s for s in stages if s not in STAGE_JOBS]
    if declared is None or bad or not stages:
        raise ConfigError(f"{path}: stage {declared!r}: expected 'ae', 'latent' or a list of them")
    if stage not in stages:
        raise ConfigError(f"{path}: space is for stage {declared!r}, not stage '{stage}'")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_param(path: Path, key: str, spec: Any) -> Param:
    where = f"{path}: params.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected exactly one distribution, e.g. {{choice: [a, b]}}, got {spec!r}")
    ((dist, args),) = spec.items()
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution '{dist}', expected one of {list(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {dist} needs a non-empty list, got {args!r}")
    if dist in ("choice", "grid"):
        if any(isinstance(v, dict) for v in args):
            raise ConfigError(f"{where}: {dist} values must be scalars or lists, got {args!r}")
        return Param(key, dist, tuple(args))
    if len(args) != 2 or not all(_is_number(v) for v in args):
        raise ConfigError(f"{where}: {dist} needs [low, high] as two finite numbers, got {args!r}")
    low, high = args
    if dist == "int":
        if not all(isinstance(v, int) for v in args):
            raise ConfigError(f"{where}: int needs integer bounds [low, high] (both inclusive), got {args!r}")
        if low > high:
            raise ConfigError(f"{where}: int low {low} > high {high}; expected low <= high")
        return Param(key, dist, (low, high))
    if low >= high:
        raise ConfigError(f"{where}: {dist} low {low} >= high {high}; expected low < high")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform low {low} must be > 0")
    return Param(key, dist, (float(low), float(high)))


# ---------------------------------------------------------------------------------------------------------
# validation against the job's config


def check_space_composes(space: SearchSpace) -> None:
    """Compose candidate values with Hydra, then check combinations with the job's validator."""
    base = [f"experiment={space.experiment}", *space.base_overrides]
    try:
        base_cfg = compose(space.job, base)
    except ConfigError as exc:
        raise ConfigError(f"{space.path}: base config {space.job} {base} does not compose: {exc}") from None
    keys = list(space.params)
    cands = [space.params[k].candidates() for k in keys]
    # Every candidate goes through the real Hydra override parser, packed into as few composes as there are
    # values in the longest list; a failing row is re-run key by key so the error names the key.
    for row in range(max(len(c) for c in cands)):
        sampled = {k: c[row % len(c)] for k, c in zip(keys, cands)}
        try:
            compose(space.job, apply_params(base, sampled))
        except ConfigError as row_exc:
            for key, value in sampled.items():
                try:
                    compose(space.job, apply_params(base, {key: value}))
                except ConfigError as exc:
                    raise ConfigError(
                        f"{space.path}: params.{key} value {value!r} is invalid for {space.job} "
                        f"experiment={space.experiment}: {exc}"
                    ) from None
            raise ConfigError(
                f"{space.path}: the combination {sampled} is invalid for {space.job} "
                f"experiment={space.experiment}: {row_exc}"
            ) from None
    # Joint rules (e.g. spatial >= temporal downsample, hidden divisible by heads) on typed configs: a merge
    # costs milliseconds where a Hydra compose costs a tenth of a second.
    combos = list(_combinations(cands))
    for combo in combos:
        cfg = base_cfg.copy()
        try:
            for key, value in zip(keys, combo):
                OmegaConf.update(cfg, key, value, merge=False)
            VALIDATORS[space.job](cfg)
        except (ConfigError, OmegaConfBaseException) as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(
                f"{space.path}: the combination {dict(zip(keys, combo))} is invalid for {space.job} "
                f"experiment={space.experiment}: {detail}"
            ) from None
    log.debug("search space %s: %d candidate combinations valid for %s", space.name, len(combos), space.job)


def _combinations(cands: list[list[Any]]) -> Iterator[tuple]:
    total = math.prod(len(c) for c in cands)
    if total <= MAX_JOINT_CHECKS:
        yield from itertools.product(*cands)
        return
    rng = random.Random(0)
    for _ in range(MAX_JOINT_CHECKS):
        yield tuple(rng.choice(c) for c in cands)


# ---------------------------------------------------------------------------------------------------------
# conversion


def to_tune(space: SearchSpace, search: str = "random") -> dict[str, Any]:
    """Ray Tune ``param_space`` (flat dotted keys) for ``search`` in random | grid | optuna.

    random: as declared. grid: choices become grid axes too (continuous ranges stay sampled per grid point).
    optuna: grid axes become choices, since Optuna's samplers cannot expand ``grid_search``.
    """
    from ray import tune

    if search not in SEARCH_MODES:
        raise ConfigError(f"search '{search}': expected one of {list(SEARCH_MODES)}")
    out: dict[str, Any] = {}
    for key, p in space.params.items():
        dist = p.dist
        if search == "grid" and dist == "choice":
            dist = "grid"
        elif search == "optuna" and dist == "grid":
            dist = "choice"
        if dist == "grid":
            out[key] = tune.grid_search(list(p.args))
        elif dist == "choice":
            out[key] = tune.choice(list(p.args))
        elif dist == "uniform":
            out[key] = tune.uniform(*p.args)
        elif dist == "loguniform":
            out[key] = tune.loguniform(*p.args)
        else:
            # tune.randint excludes its upper bound; space files give both ends inclusive
            out[key] = tune.randint(p.args[0], p.args[1] + 1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Hydra overrides

_PLAIN_STR = re.compile(r"^[A-Za-z_/][\w./:-]*$")
_HYDRA_WORDS = {"true", "false", "null", "none", "inf", "nan"}


def format_value(value: Any) -> str:
    """A Python value as a Hydra override value: lists as ``[a,b]``, strings quoted when not plain words."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, str)):
        value = value.item()  # numpy scalars sampled by Tune
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"override value {value!r}: expected a finite number")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        if "${" in value:
            raise ConfigError(f"override value {value!r}: interpolations ('${{') are not sweepable values")
        if _PLAIN_STR.match(value) and value.lower() not in _HYDRA_WORDS:
            return value
        # Hydra's quoted strings: backslashes are literal except in runs before a quote or the closing quote.
        quoted = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        quoted = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted)
        return "'" + quoted + "'"
    raise ConfigError(f"override value {value!r}: expected a scalar or a list, got {type(value).__name__}")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def apply_params(overrides: Sequence[str], params: Mapping[str, Any]) -> list[str]:
    """``overrides`` with each sampled ``params`` key set; a param replaces an override of the same key."""
    keys = set(params)
    out = [o for o in overrides if _override_key(o) not in keys]
    out += [f"{key}={format_value(value)}" for key, value in params.items()]
    return out
