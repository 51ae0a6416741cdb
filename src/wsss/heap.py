"""Process memory: keep glibc's heap from growing with the number of image sizes a stage has seen.

glibc's ``malloc`` serves a request of at least ``M_MMAP_THRESHOLD`` bytes by its own ``mmap``, given
back to the system on ``free``. By default that threshold moves up to the largest block freed so far
(at most 32 MiB), so once a stage has freed one image-sized buffer, later ones come from the heap; with
images of many sizes (VOC, LID) the heap's free gaps rarely fit the next request and the process's
resident memory grows with the dataset rather than with the batch. A fixed threshold stops that
(measured in ``benchmarks/inference_memory.py``).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt(3) parameter number in glibc's malloc.h
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own environment variable for the same setting
DEFAULT_THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more by its own mapping, for the rest of this
    process and the processes it forks (loader workers, CRF pools). Returns False, changing nothing,
    off glibc or where ``$MALLOC_MMAP_THRESHOLD_`` already decides."""
    if threshold < 1:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if not sys.platform.startswith("linux") or ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library: no such knob
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
