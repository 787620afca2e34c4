"""The CLI process's memory allocator: large tensors reused instead of mapped afresh.

glibc's malloc serves blocks above its mmap threshold (128 KiB, raised on its own to at most
32 MiB) with a fresh ``mmap`` each and returns them with ``munmap`` on free. A shadow-graph
forward at 224 pixels allocates activations of 20-60 MiB per batch (MobileNetV2: 13 x 96 x
112 x 112 floats), so every such tensor was faulted in page by page and zeroed by the
kernel again on every node of every batch: about 1.5 million page faults and 3.6 of the 16
CPU seconds of a MobileNetV2 ``locate`` were system time. With the mmap threshold and the
trim threshold at :data:`REUSE_BELOW`, freed blocks stay in the heap and the next tensor of
that size reuses them (values are unchanged: only where the memory comes from). Peak RSS
is that of the live tensors plus the heap's free blocks, measured in benchmarks/SCALE.md.

Only the CLI calls :func:`reuse_freed_memory` (a process-wide setting a library should not
make for its caller); on other C libraries it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: Blocks below this come from the heap and freed memory below it is kept for reuse.
REUSE_BELOW = 1 << 30
#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def reuse_freed_memory() -> bool:
    """Keep freed blocks of up to :data:`REUSE_BELOW` bytes for reuse (glibc only);
    whether the setting took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, REUSE_BELOW)) and \
        bool(mallopt(M_TRIM_THRESHOLD, REUSE_BELOW))
