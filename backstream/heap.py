"""Keep freed body buffers in the heap instead of handing them back to the kernel.

A tunnel moving a big body allocates and frees buffers of a few hundred KiB
many times a second (a chunk from libcurl, a batch, its masked copy, a read
buffer). glibc's defaults return such memory to the kernel as soon as it is
freed (by ``munmap`` above the mmap threshold, by trimming the heap top
otherwise), so every new buffer is faulted in again page by page: measured on
a 10 MiB download, ~450 page faults per MiB in the client and a quarter of its
CPU. Raising both thresholds lets the heap reuse those pages. The memory kept
is bounded by ``TRIM_THRESHOLD`` and only ever what a burst already used, so
peak RSS does not move.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("backstream")

#: mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the heap (a WebSocket message is at most ~1 MiB).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse before trimming.
TRIM_THRESHOLD = 8 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc for buffer churn; False (and no change) on other C libraries."""
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    if not ok:
        log.debug("mallopt refused the heap settings; keeping glibc's defaults")
    return ok


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (ValueError, OSError, AttributeError):
        return False  # musl, macOS, Windows
