"""Training workers' malloc setting (cadiff.runtime.memory) and its config key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cadiff.config import compose
from cadiff.errors import ConfigError
from cadiff.runtime.memory import MMAP_THRESHOLD_MAX_KB, set_mmap_threshold


def test_unset_threshold_leaves_malloc_alone() -> None:
    assert set_mmap_threshold(None) is False
    assert set_mmap_threshold(0) is False


_PROBE = """
import ctypes, sys
from cadiff.runtime.memory import set_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                "keepcost".split()]
libc.mallinfo2.restype = Info
took = set_mmap_threshold(int(sys.argv[1])) if sys.argv[1] != "none" else None
libc.free(libc.malloc(8 << 20))  # an 8 MiB block is mmapped; freeing it raises glibc's dynamic threshold to 8 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(6 << 20)  # heap (dynamic threshold) or its own mapping (fixed 1 MiB threshold)?
print(took, libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(("setting", "expected"), [("none", ["None", "0"]), ("1024", ["True", "1"])])
def test_a_fixed_threshold_keeps_large_blocks_on_their_own_mappings(setting: str, expected: list[str]) -> None:
    # in a child process: the setting is process-wide and would outlive the test here
    out = subprocess.run([sys.executable, "-c", _PROBE, setting], capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected


def test_config_key_is_validated_at_load() -> None:
    assert compose("train_ae", ["experiment=ae_tiny"]).trainer.malloc_mmap_threshold_kb == 16384
    assert compose("train_ae", ["experiment=ae_tiny", "trainer.malloc_mmap_threshold_kb=null"]
                   ).trainer.malloc_mmap_threshold_kb is None
    for bad in (0, -4, MMAP_THRESHOLD_MAX_KB + 1):
        with pytest.raises(ConfigError, match=rf"trainer\.malloc_mmap_threshold_kb' = {bad}: expected "
                                              rf"1\.\.{MMAP_THRESHOLD_MAX_KB} or null"):
            compose("train_latent", ["experiment=dit_tiny", f"trainer.malloc_mmap_threshold_kb={bad}"])
