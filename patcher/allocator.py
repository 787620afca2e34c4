"""The process's memory allocator: a phase's large tensors reused instead of mapped afresh.

glibc's malloc serves blocks above its mmap threshold (128 KiB, raised on its own to at most
32 MiB) with a fresh ``mmap`` each and returns them with ``munmap`` on free. A shadow-graph
forward at 224 pixels allocates activations of 20-60 MiB per batch (MobileNetV2: 13 x 96 x
112 x 112 floats), so every such tensor was faulted in page by page and zeroed by the
kernel again on every node of every batch: about 1.5 million page faults and 3.6 of the 16
CPU seconds of a MobileNetV2 ``locate`` were system time.

Inside a phase (:func:`phase`: every :func:`patcher.progress.progress` bar, i.e. the
statistics, attribution, accuracy and verification passes) blocks below :data:`REUSE_BELOW`
come from the heap and freed ones stay there, so the next batch's tensors reuse them
(values are unchanged: only where the memory comes from). At the phase's end the heap's
free pages go back to the system (``malloc_trim``) and the thresholds return to 128 KiB,
so work outside the phases (an edit's fit, which holds one layer's keys) maps its blocks
afresh as before: kept for the whole run, the heap's free blocks raised a MobileNetV2
``patch``'s peak RSS from 2.50 to 3.35 GB.

Only the CLI calls :func:`reuse_freed_memory` (a process-wide setting a library should not
make for its caller); on other C libraries nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

#: Inside a phase, blocks below this come from the heap and freed memory below it is kept.
REUSE_BELOW = 1 << 30
#: Outside the phases: glibc's own starting thresholds.
OUTSIDE = 128 << 10
#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_libc = None  # the C library, once reuse_freed_memory took effect
_depth = 0
_lock = threading.Lock()


def reuse_freed_memory() -> bool:
    """Let :func:`phase` keep freed blocks for reuse (glibc only); whether it can."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    if _set(libc, OUTSIDE):
        _libc = libc
    return _libc is not None


def _set(libc, threshold: int) -> bool:
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))


@contextmanager
def phase() -> Iterator[None]:
    """Reuse freed blocks inside the ``with`` (nested phases count as one); at its end hand
    the free pages back. Nothing changes unless :func:`reuse_freed_memory` took effect."""
    global _depth
    libc = _libc
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(libc, REUSE_BELOW)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, OUTSIDE)
                libc.malloc_trim(0)
