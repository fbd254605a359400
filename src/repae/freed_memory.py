"""Keep the memory torch frees for its next CPU tensors (glibc's malloc settings), process-wide.

glibc maps each block above its mmap threshold (which it raises by itself, to at most 32 MiB) afresh and unmaps
it when freed, and trims the free top of its heap past a second threshold; each large tensor then page-faults
its memory in again, page by page. `python benchmarks/freed_memory.py` on a 2-core AMD EPYC (two alternating
processes each, docs/benchmarks/freed_memory_epyc.json): the toy REPA-E step 8,600-10,800 faults and 185-193 ms
with glibc's defaults, 170-250 faults and 180-185 ms kept; an Inception forward (FID, 32 images at 256 px)
940,000-960,000 faults and 2.70-2.76 s, none and 1.59-1.67 s kept. The cost: memory kept on the heap is not
given back, and the Inception process peaked at 1.60 GiB RSS against 0.99-1.01 (the toy step's at 0.68-0.69
either way).
No torch import here: the CLI calls this before any command, `repae.nn_utils.init_device` for programs that
use the library directly.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
OPT_OUT = "REPAE_SYSTEM_MALLOC"  # =1 in the environment: leave glibc's defaults


def reuse_freed_memory() -> bool:
    """Where the C library is glibc: serve large allocations from the heap and never trim it, so memory that is
    freed is reused instead of unmapped and faulted in again. One-way (glibc cannot go back to its automatic
    threshold). True where set; False off glibc or with REPAE_SYSTEM_MALLOC=1. A glibc that refuses a 1 GiB mmap
    threshold gets 32 MiB, its long-standing maximum: blocks above that are still mapped afresh."""
    if os.environ.get(OPT_OUT) == "1":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mapped = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
