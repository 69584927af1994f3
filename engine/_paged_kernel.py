"""engine.paged_kernel's numba kernel (imported only through it). fastmath: sums are
reassociated (vectorised), as SDPA's own kernels do; inputs are finite."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True, fastmath=True)

# exp(x) for x <= 0 as 2^k * p(r), x = k ln2 + r, |r| <= ln2 / 2, p the degree-6 Taylor
# polynomial of e^r (relative error < 2e-7 on that range, below float32's rounding of the
# scores); 2^k written as float32 bits. Plain arithmetic, so the loop vectorises (numba's
# math.exp is a scalar call per element: ~40 % of this kernel's time).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)


@_jit
def _exp_rows(s: Any, n: int, m: Any, bits: Any, den: Any) -> None:  # pragma: no cover - compiled
    """s[j, :n] <- exp(s[j, :n] - m[j]); den[j] <- their sum."""
    fb = bits.view(np.float32)
    for j in range(s.shape[0]):
        mj = m[j]
        for t in range(n):
            x = max(s[j, t] - mj, np.float32(-87.0))
            k = np.floor(x * _LOG2E + np.float32(0.5))
            r = (x - k * _LN2_HI) - k * _LN2_LO
            p = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (
                np.float32(1.0 / 6) + r * (np.float32(1.0 / 24) + r * (
                    np.float32(1.0 / 120) + r * np.float32(1.0 / 720))))))
            s[j, t] = p
            bits[t] = (np.int32(k) + np.int32(127)) << np.int32(23)
        tot = np.float32(0.0)
        for t in range(n):
            e = s[j, t] * fb[t]
            s[j, t] = e
            tot += e
        den[j] = tot


@_jit
def decode(q: Any, kc: Any, vc: Any, table: Any, lens: Any, scale: float, window: int,
           out: Any) -> None:  # pragma: no cover - compiled
    """q [B, H, D] f32; kc, vc [blocks, BS, KVH, D] f32 (one layer's paged keys, values);
    table [B, W] int64 block ids; lens [B] int64 (the query sits at lens[b] - 1 and sees
    positions [start, lens[b]), start = lens[b] - window when window > 0); out [B, H, D]."""
    nb, hd = q.shape[0], q.shape[2]
    bs, kvh = kc.shape[1], kc.shape[2]
    g = q.shape[1] // kvh
    width = table.shape[1] * bs
    s = np.empty((g, width), np.float32)
    bits = np.empty(width, np.int32)
    acc = np.empty((g, hd), np.float32)
    mx = np.empty(g, np.float32)
    den = np.empty(g, np.float32)
    sc = np.float32(scale)
    for b in range(nb):
        end = lens[b]
        start = max(0, end - window) if window > 0 else 0
        n = end - start
        first, last = start // bs, (end - 1) // bs
        for h in range(kvh):
            q0 = h * g
            for j in range(g):
                mx[j] = np.float32(-3.0e38)
            # Scores: each key row is read once for the query heads it serves (GQA); blocks
            # walked in order (no division per position).
            for bi in range(first, last + 1):
                blk = table[b, bi]
                lo = max(start - bi * bs, 0)
                hi = min(end - bi * bs, bs)
                for r in range(lo, hi):
                    i = bi * bs + r - start
                    for j in range(g):
                        dot = np.float32(0.0)
                        for d in range(hd):
                            dot += q[b, q0 + j, d] * kc[blk, r, h, d]
                        dot *= sc
                        s[j, i] = dot
                        mx[j] = max(mx[j], dot)
            _exp_rows(s, n, mx, bits, den)
            for j in range(g):
                for d in range(hd):
                    acc[j, d] = np.float32(0.0)
            for bi in range(first, last + 1):
                blk = table[b, bi]
                lo = max(start - bi * bs, 0)
                hi = min(end - bi * bs, bs)
                for r in range(lo, hi):
                    i = bi * bs + r - start
                    for j in range(g):
                        p = s[j, i]
                        for d in range(hd):
                            acc[j, d] += p * vc[blk, r, h, d]
            for j in range(g):
                inv = np.float32(1.0) / den[j]
                for d in range(hd):
                    out[b, q0 + j, d] = acc[j, d] * inv
