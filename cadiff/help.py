"""``cadiff --help`` and ``cadiff <job> --help``: the jobs, and a job's config groups and options from its schema.

Options are read from the dataclass schemas in :mod:`cadiff.config` (type, default and the comment written
beside each field), so the help cannot drift from what the config accepts.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

from cadiff.config import CONF_MODULE, JOB_SCHEMAS
from cadiff.jobs import JOBS

CONF_DIR = Path(__file__).resolve().parent / "conf"
_FIELD_RE = re.compile(r"^\s+(\w+):[^#=]+(?:=[^#]*)?(?:#\s*(.+))?$")
_COMMENT_RE = re.compile(r"^\s+#\s?(.*)$")


def _summary(job: str) -> str:
    return (inspect.getdoc(JOBS[job]) or "").split("\n\n")[0].replace("\n", " ")


def jobs_help() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: cadiff <job> [key=value ...] [--help] [--cfg job] [--verbose]", "", "jobs:"]
    lines += [f"  {job:<{width}}  {_summary(job)}" for job in JOBS]
    lines += ["", "cadiff <job> --help lists a job's config groups and options; python jobs/<job>.py takes the same arguments."]
    return "\n".join(lines)


def _comments(cls: type) -> dict[str, str]:
    """The ``# comment`` written beside each field of a schema dataclass (and its bases)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        block: list[str] = []  # comment lines right above a field describe it when it has none of its own
        for line in source.splitlines():
            c = _COMMENT_RE.match(line)
            if c:
                block.append(c.group(1).strip())
                continue
            m = _FIELD_RE.match(line)
            if m and (m.group(2) or block):
                out[m.group(1)] = (m.group(2) or " ".join(block)).strip()
            block = []
    return out


def _options(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, comment) of every leaf of ``schema``."""
    rows = []
    comments = _comments(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            rows += _options(type(default), f"{key}.")
            continue
        tp = hints.get(f.name, f.type)
        optional = type(None) in typing.get_args(tp)
        base = [a for a in typing.get_args(tp) if a is not type(None)] if optional else [tp]
        name = getattr(base[0], "__name__", str(base[0]).replace("typing.", ""))
        rows.append((key, name + (" | null" if optional else ""), "null" if default is None else repr(default),
                     comments.get(f.name, "")))
    return rows


def _groups(job: str) -> dict[str, list[str]]:
    """Config groups a job's primary YAML selects from (``defaults:``), with their packaged options."""
    text = (CONF_DIR / f"{job}.yaml").read_text()
    groups = re.findall(r"^\s*-\s*(?:optional\s+)?(\w+)\s*:", text, re.M)
    return {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in groups if (CONF_DIR / g).is_dir()}


def job_help(job: str) -> str:
    doc = inspect.getdoc(JOBS[job]) or ""
    lines = [f"usage: cadiff {job} [key=value ...] [--cfg job] [--verbose]   (or: python jobs/{job}.py ...)", "", doc, ""]
    groups = _groups(job)
    if groups:
        lines.append("config groups (select with group=option; packaged in " + CONF_MODULE.replace(".", "/") + "):")
        lines += [f"  {g}: {', '.join(opts)}" for g, opts in groups.items()]
        lines.append("")
    lines.append("options (key: type = default  # meaning):")
    for key, tp, default, comment in _options(JOB_SCHEMAS[job]):
        lines.append(f"  {key}: {tp} = {default}" + (f"  # {comment}" if comment else ""))
    lines += ["", "overrides: key=value (e.g. trainer.max_steps=100), lists as key=[1,2]; --cfg job prints the resolved "
                  "config and exits; --verbose adds tracebacks to errors."]
    return "\n".join(lines)
