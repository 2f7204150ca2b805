"""Keep freed tensor memory in the process for reuse (glibc), instead of unmapping it.

A DP-SGD step allocates and frees tens of MB of short-lived tensors (per-sample gradients,
patch matrices). With glibc's defaults, blocks that large are mmap'ed and unmapped on every step,
so the next step page-faults on fresh zeroed pages: on the reference CPU that cost about a third
of the DP overhead of the demo model. Raising the mmap and trim thresholds keeps such blocks in
the heap, where the next step reuses them. The price is a resident size that stays near its peak
(what a training process reaches anyway).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's mmap/trim thresholds (once per process); returns whether they are set.

    A no-op returning False where the C library is not glibc (macOS, Windows, musl).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also turns off glibc's dynamic
    # adjustment of both, so both are set.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
