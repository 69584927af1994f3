"""KV copies at memory speed, with the transfer's checksum in the same pass.

The same-node KV transfer (kvtransfer/shm.py) moves a request's prompt KV twice: the
prefill worker gathers it out of its paged cache into a shared-memory slot, the decode
worker scatters it out of the slot into its own paged cache. Each copy also sums the
64-bit words it moves (the transfer's checksum): done in the copy loop the sum costs no
memory traffic of its own, where a separate pass reads every byte again (~30% on top,
benchmarks/results/2026-12-06-shm).

The kernels are numba functions (``nogil``: the admission's scatter runs beside the
engine thread) when numba is importable; ``available()`` says whether they are, and
callers keep their numpy/torch path otherwise. The sum is the wrap-around sum of the
little-endian 64-bit words of the bytes, the same value as ``kvtransfer.shm.checksum``.

Arrays are numpy, 2-D ``[rows, words]`` of ``uint64``: one row per token (its heads'
bytes), one cache array per (layer, K or V) viewed as ``[blocks * block_size, words]``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

_lock = threading.Lock()
_kernels: Any = None  # None: not tried yet; False: numba missing; else the namespace


def _build() -> Any:
    try:
        from engine import _kvcopy_kernels as k
    except ImportError:  # numba is not installed
        return False
    # Compile now (or load numba's on-disk cache), on tiny arrays of the types used.
    a = np.zeros((4, 2), dtype=np.uint64)
    b = np.ones((4, 2), dtype=np.uint64)
    tbl = np.array([1, 0], dtype=np.int64)
    k.copy_sum(a.reshape(-1), b.reshape(-1))
    k.word_sum(a.reshape(-1))
    k.scatter_sum(a, b[:2], tbl, 0, 2)
    k.gather_sum(b[:2], a, tbl, 2)
    sums = np.zeros(4, dtype=np.uint64)
    k.copy_rows_sum(a, b, sums)
    k.rows_sum(a, sums)
    return k


def _get() -> Any:
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _kernels = _build()
    return _kernels


def available() -> bool:
    """Whether the fused kernels exist here (numba importable); compiles them once."""
    return bool(_get())


def words(a: np.ndarray, rows: int) -> np.ndarray | None:
    """A C-contiguous numpy array as ``[rows, words]`` uint64, or None when its bytes per
    row are not a whole number of 64-bit words or it is not contiguous."""
    if not a.flags.c_contiguous or a.nbytes % max(1, rows) or (a.nbytes // max(1, rows)) % 8:
        return None
    return a.reshape(-1).view(np.uint8).view(np.uint64).reshape(rows, -1)


def _check_rows(cache: np.ndarray, rows: np.ndarray, table: np.ndarray, first: int, n: int, bs: int) -> None:
    """The kernels do not check bounds: every index is checked here first (a bad block
    table raises, as numpy's indexing would, instead of writing outside the cache)."""
    if rows.shape[1] != cache.shape[1] or cache.shape[0] % bs:
        raise ValueError(f"KV rows of {rows.shape[1]} words do not fit a cache of {cache.shape} (block {bs})")
    if n == 0:
        return
    lo, hi = first // bs, (first + n - 1) // bs + 1
    if first < 0 or hi > len(table):
        raise IndexError(f"tokens {first}..{first + n} need blocks {lo}..{hi} of a table of {len(table)}")
    used = table[lo:hi]
    if used.min() < 0 or used.max() >= cache.shape[0] // bs:
        raise IndexError(f"block table holds blocks outside 0..{cache.shape[0] // bs - 1}")


def copy_sum(dst: np.ndarray, src: np.ndarray) -> int:
    """dst[:] = src (1-D uint64, same length); the wrap-around sum of the words."""
    if dst.shape != src.shape or dst.ndim != 1:
        raise ValueError(f"copy of {src.shape} words into {dst.shape}")
    return int(_get().copy_sum(dst, src))


def word_sum(src: np.ndarray) -> int:
    return int(_get().word_sum(src.reshape(-1)))


def scatter_sum(cache: np.ndarray, src: np.ndarray, table: np.ndarray, first: int, block_size: int) -> int:
    """Token t of ``src`` ([n, words]) to row ``table[(first+t)//bs]*bs + (first+t)%bs`` of
    ``cache`` ([blocks * bs, words]); the sum of the words moved."""
    _check_rows(cache, src, table, first, src.shape[0], block_size)
    return int(_get().scatter_sum(cache, src, table, first, block_size))


def gather_sum(out: np.ndarray, cache: np.ndarray, table: np.ndarray, block_size: int) -> int:
    """Row ``t`` of ``out`` ([n, words]) from row ``table[t//bs]*bs + t%bs`` of ``cache``;
    the sum of the words moved."""
    _check_rows(cache, out, table, 0, out.shape[0], block_size)
    return int(_get().gather_sum(out, cache, table, block_size))


def copy_rows_sum(dst: np.ndarray, src: np.ndarray) -> list[int]:
    """dst[:] = src ([rows, words] uint64, same shape) in one pass; each row's word sum."""
    if dst.shape != src.shape or dst.ndim != 2:
        raise ValueError(f"copy of {src.shape} words into {dst.shape}")
    sums = np.empty(src.shape[0], dtype=np.uint64)
    _get().copy_rows_sum(dst, src, sums)
    return [int(x) for x in sums]


def rows_sum(src: np.ndarray) -> list[int]:
    """Each row's word sum of ``src`` ([rows, words] uint64)."""
    sums = np.empty(src.shape[0], dtype=np.uint64)
    _get().rows_sum(src, sums)
    return [int(x) for x in sums]
