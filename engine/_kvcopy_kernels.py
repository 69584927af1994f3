"""engine.kvcopy's numba kernels (imported only through engine.kvcopy, which falls back
to numpy/torch where numba is missing). Sums are wrap-around uint64 sums of the words
moved; ``nogil``: they run beside the engine thread."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True)


@_jit
def copy_sum(dst: Any, src: Any) -> Any:  # pragma: no cover - compiled
    s = np.uint64(0)
    for i in range(src.shape[0]):
        v = src[i]
        dst[i] = v
        s += v
    return s


@_jit
def word_sum(src: Any) -> Any:  # pragma: no cover - compiled
    s = np.uint64(0)
    for i in range(src.shape[0]):
        s += src[i]
    return s


@_jit
def scatter_sum(cache: Any, src: Any, table: Any, first: int, bs: int) -> Any:  # pragma: no cover
    # Token t of src goes to row table[(first + t) // bs] * bs + (first + t) % bs of cache.
    s = np.uint64(0)
    n, w = src.shape
    for t in range(n):
        p = first + t
        row = table[p // bs] * bs + p % bs
        for k in range(w):
            v = src[t, k]
            cache[row, k] = v
            s += v
    return s


@_jit
def gather_sum(out: Any, cache: Any, table: Any, bs: int) -> Any:  # pragma: no cover - compiled
    s = np.uint64(0)
    n, w = out.shape
    for t in range(n):
        row = table[t // bs] * bs + t % bs
        for k in range(w):
            v = cache[row, k]
            out[t, k] = v
            s += v
    return s


@_jit
def copy_rows_sum(dst: Any, src: Any, sums: Any) -> None:  # pragma: no cover - compiled
    # dst, src: [rows, words]; sums[r]: the wrap-around sum of row r's words.
    rows, w = src.shape
    for r in range(rows):
        s = np.uint64(0)
        for k in range(w):
            v = src[r, k]
            dst[r, k] = v
            s += v
        sums[r] = s


@_jit
def rows_sum(src: Any, sums: Any) -> None:  # pragma: no cover - compiled
    rows, w = src.shape
    for r in range(rows):
        s = np.uint64(0)
        for k in range(w):
            s += src[r, k]
        sums[r] = s
