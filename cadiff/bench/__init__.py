"""Benchmark libraries (the scripts in benchmarks/ are their command lines); importable by tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cadiff.io import write_text_atomic


def write_results(out_dir: str | Path, stem: str, result: dict[str, Any], markdown: str) -> Path:
    """``<out_dir>/<stem>.json`` (first: the measurements survive a rendering failure) and ``<stem>.md``, each
    written to a temp file and renamed; values JSON cannot hold are written as their ``str``. Returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
    write_text_atomic(out / f"{stem}.md", markdown)
    return path
