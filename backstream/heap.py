"""Keep freed body buffers in the heap instead of handing them back to the kernel.

A tunnel moving a big body allocates and frees buffers of a few hundred KiB
many times a second (a chunk from libcurl, a batch, its masked copy, a read
buffer). glibc's defaults return such memory to the kernel as soon as it is
freed (by ``munmap`` above the mmap threshold, by trimming the heap top
otherwise), so every new buffer is faulted in again page by page: measured on
a 10 MiB download, ~450 page faults per MiB in the client and a quarter of its
CPU. Raising both thresholds lets the heap reuse those pages. Only what a
burst already used stays resident (measured: peak RSS does not move), and a
free heap top larger than ``TRIM_THRESHOLD`` is still given back.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

log = logging.getLogger("backstream")

#: mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from the heap (body chunks and message fragments).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse before trimming.
TRIM_THRESHOLD = 8 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc for buffer churn; True if it took, False on other C libraries."""
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: glibc's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Both or neither: the trim threshold alone would only keep more memory.
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt refused the heap settings; keeping glibc's defaults")
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Give free heap pages back to the kernel (glibc's ``malloc_trim``).

    For after a burst far larger than the usual buffers, such as a WebSocket
    message of many MiB that arrived as 256 KiB fragments: those freed
    fragments are spread through the heap, which the trim threshold alone
    does not return, and would stay resident.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim() -> Any:
    global _trim
    if _trim is False:
        _trim = None
        if _is_glibc():
            try:
                _trim = ctypes.CDLL(None).malloc_trim
                _trim.argtypes = (ctypes.c_size_t,)
                _trim.restype = ctypes.c_int
            except (OSError, AttributeError):
                _trim = None
    return _trim


_trim: Any = False  # not looked up yet


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (ValueError, OSError, AttributeError):
        return False  # musl, macOS, Windows
