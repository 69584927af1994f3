"""Allocator tuning for CPU serving: keep the step's multi-MB temporaries in the heap.

glibc's malloc hands every block above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised
dynamically up to 32 MiB as such blocks are freed) to a fresh ``mmap`` and gives it back
with ``munmap`` on free, and trims the heap top above ``M_TRIM_THRESHOLD``. A decode step
allocates and frees tensors of several MB per layer (the block-table gather of K and V,
the attention scores), so on this engine each step paid page faults on memory it had just
returned: decode steps of 16 sequences at 1536 positions took 51 ms where 16 at 1024 took
17 ms (measured on the demo model, session 4), a super-linear growth in batch x context
that no latency model of DistServe's form follows. With both thresholds raised the same
steps take 13 ms and 9 ms and scale linearly in context.

vLLM's CPU backend documentation recommends preloading tcmalloc for the same reason; we
reach the same effect with two ``mallopt`` calls, no extra library. The price is memory:
each process keeps up to ``trim_threshold`` of freed heap instead of returning it.

Applied once per process by ``engine.engine.build_runner`` (every engine worker and tensor
parallel rank; side by side: ``benchmarks/decode_bench.py``); ``SPLITSERVE_MALLOC_TUNE=0`` turns it off (for
side-by-side benchmarks). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the dynamic threshold (64-bit)
TRIM_THRESHOLD = 256 << 20
ENV = "SPLITSERVE_MALLOC_TUNE"

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether the
    tuning is in effect (False: turned off by ``SPLITSERVE_MALLOC_TUNE=0``, not glibc, or
    mallopt refused). Idempotent: later calls return the first call's answer."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _applied = False
        return False
    libc = _glibc()
    if libc is None:
        _applied = False
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        logger.warning("mallopt refused the allocator thresholds; decode steps may page-fault on large temporaries")
    _applied = ok
    return ok


def malloc_tuned() -> bool:
    """Whether ``tune_malloc`` has put the thresholds in effect in this process."""
    return bool(_applied)
