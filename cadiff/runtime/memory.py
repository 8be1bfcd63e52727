"""Process memory settings for training workers and benchmarks: freed activations go back to the OS.

glibc's malloc serves a request from ``mmap`` only above a threshold that starts at 128 KiB and, by default,
rises to the size of every mmapped block freed (up to 32 MiB on 64-bit, ``mallopt(3)``). After the first
training step every activation-sized tensor therefore comes from the heap, where a freed block below a live one
cannot be returned: the process keeps a fragmented high-water mark. A fixed threshold keeps large tensors on
mmap, unmapped when freed, at the price of fresh page faults each time one is allocated again.

Measured on the default stage-1 training step (``experiment=ae_default``), fp32, 2 threads, 3 steps per process
on a 2-core VM whose step times vary by ~15% between runs: at 1x1x65x64x64 the peak RSS is 2.06 GB with glibc's
default, 1.89 GB with a 16 MiB threshold and 1.75 GB with 4 MiB (``benchmarks/results/model_step.md``, its own
run: 2.12 against 1.95 GB); at 1x1x17x64x64 a 16 MiB threshold leaves the
step time unchanged (3.8 s against 3.7-3.8 s), while 4 MiB (or 1 MiB) makes it ~50% slower: most 17-frame
activations are 2-18 MB, and page-faulting them anew at every step costs more than the convolutions save.
``trainer.malloc_mmap_threshold_kb`` therefore defaults to 16 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # <malloc.h>
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, the ceiling of its own dynamic threshold: a fixed one above it would
# keep more on the heap than glibc's default does (older glibc refuses such values, 2.36 accepts them)
MMAP_THRESHOLD_MAX_KB = 32 * 1024


def set_mmap_threshold(kib: int | None) -> bool:
    """Fix glibc's mmap threshold at ``kib`` KiB (disabling its dynamic raise); ``None`` or 0 leaves malloc alone.

    Returns whether the setting took effect: False off glibc (macOS, musl), where nothing is changed, and where
    glibc refuses the value (``trainer.malloc_mmap_threshold_kb`` is checked against ``MMAP_THRESHOLD_MAX_KB``
    when the config loads).
    """
    if not kib:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        log.debug("no glibc mallopt: malloc settings left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, int(kib) * 1024):
        log.warning("glibc refused an mmap threshold of %d KiB: malloc settings left as they are", kib)
        return False
    return True
