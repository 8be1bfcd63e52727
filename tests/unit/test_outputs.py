"""Job output folders: nothing a job did not create is deleted, renamed or written into."""

from __future__ import annotations

import os

import pytest

from cadiff.errors import ConfigError
from cadiff.io import OUTPUT_MARKER, atomic_dir, check_output_dir


def _write(out, job, text="new", overwrite=False):
    with atomic_dir(out, job, overwrite) as tmp:
        (tmp / "result.txt").write_text(text)


def test_new_and_empty_folders_are_written_with_the_job_marker(tmp_path):
    _write(tmp_path / "new", "sample")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", "sample")
    for name in ("new", "empty"):
        assert (tmp_path / name / "result.txt").read_text() == "new"
        assert '"sample"' in (tmp_path / name / OUTPUT_MARKER).read_text()


def test_foreign_folder_and_file_are_refused_untouched(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "NOTES.txt").write_text("keep")
    with pytest.raises(ConfigError, match="non-empty folder that no cadiff sample run wrote"):
        _write(foreign, "sample", overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["NOTES.txt"]
    a_file = tmp_path / "table.csv"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        _write(a_file, "sample", overwrite=True)
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "table.csv"]


def test_own_earlier_output_needs_overwrite_and_another_jobs_output_is_refused(tmp_path):
    out = tmp_path / "out"
    _write(out, "sample", "first")
    with pytest.raises(ConfigError, match="earlier sample output; pass overwrite=true"):
        _write(out, "sample", "second")
    assert (out / "result.txt").read_text() == "first"
    _write(out, "sample", "second", overwrite=True)
    assert (out / "result.txt").read_text() == "second"
    with pytest.raises(ConfigError, match="holds the output of cadiff sample, not encode_latents"):
        check_output_dir(out, "encode_latents", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temp or .old folder may remain"


def test_a_failing_job_leaves_the_earlier_output_and_no_temp_folder(tmp_path):
    out = tmp_path / "out"
    _write(out, "sample", "first")
    with pytest.raises(MemoryError), atomic_dir(out, "sample", overwrite=True) as tmp:
        (tmp / "result.txt").write_text("half")
        raise MemoryError
    assert (out / "result.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _write(tmp_path / "out", "sample")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_benchmark_results_are_written_whole_json_and_markdown(tmp_path):
    """The benchmark scripts' results: a folder created, both files complete, no temp file left, a value JSON
    cannot hold (a path) written as text."""
    import json
    from pathlib import Path

    from cadiff.bench import write_results

    path = write_results(tmp_path / "results", "bench", {"summary": {"x": 1.5}, "where": Path("/data/x")}, "# t\n")
    assert path == tmp_path / "results" / "bench.json"
    assert json.loads(path.read_text()) == {"summary": {"x": 1.5}, "where": "/data/x"}
    assert (tmp_path / "results" / "bench.md").read_text() == "# t\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["bench.json", "bench.md"]
