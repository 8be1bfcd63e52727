"""The observers and in-process faults of ``cadiff.testing.faults`` that the reliability report relies on."""

from __future__ import annotations

import errno

import pytest

from cadiff.testing.faults import (
    damage_latest_and_rerun,
    describe_kept,
    disk_full_after,
    fail_on_call,
    restarts_since,
    snapshot,
)


def test_describe_kept_reports_what_a_folder_holds_compared_with_before(tmp_path):
    out = tmp_path / "out"
    assert describe_kept(out, None) == "out absent"
    out.mkdir()
    (out / "a.bin").write_bytes(b"a")
    before = snapshot([out])[str(out)]
    assert describe_kept(out, before) == "out byte-identical (sha256 of its 1 files)"
    assert describe_kept(out, None) == "out created: ['a.bin']"
    (out / "a.bin").write_bytes(b"b")  # same size, other bytes
    (out / "new.bin").write_bytes(b"n")
    assert describe_kept(out, before) == "out CHANGED: ['a.bin', 'new.bin']"
    for path in out.iterdir():
        path.unlink()
    out.rmdir()
    assert describe_kept(out, before) == "out absent (it existed before: removed)"


def test_fail_on_call_and_disk_full_after_raise_where_asked(tmp_path):
    calls = []
    double = fail_on_call(lambda x: calls.append(x) or 2 * x, 2, MemoryError())
    assert double(3) == 6
    with pytest.raises(MemoryError):
        double(4)
    assert double(5) == 10 and calls == [3, 5]
    writer = disk_full_after(lambda samples, tree, split: list(samples), 2)
    with pytest.raises(OSError) as info:
        writer(iter(range(5)), tmp_path, "train")
    assert info.value.errno == errno.ENOSPC and "clips-000005.tar" in info.value.filename


def test_restarts_since_sees_only_the_restarts_of_the_appended_run():
    killed = [1, 2, 3, 4, 5]  # a first run killed at step 5, after checkpoint 4
    resumed = [*killed, 3, 4, 5, 6]  # its re-run went on from checkpoint 2
    assert restarts_since(killed, resumed) == [2]
    assert restarts_since(resumed, [*resumed, 7, 8]) == []  # the next re-run went on from 6: no step went back
    assert restarts_since(resumed, [*resumed, 5, 6]) == [4]
    assert restarts_since([], [1, 2, 3]) == []


def test_damage_latest_and_rerun_runs_nothing_without_a_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert damage_latest_and_rerun(["false"], tmp_path, tmp_path, "header") == {"damaged": None}
