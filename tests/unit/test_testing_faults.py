"""The observers and in-process faults of ``cadiff.testing.faults`` that the reliability report relies on."""

from __future__ import annotations

import errno

import pytest

from cadiff.testing.faults import describe_kept, disk_full_after, fail_on_call, snapshot


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
