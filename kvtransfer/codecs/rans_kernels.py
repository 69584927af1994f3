"""numba kernels of the rANS coder (``rangecoding``) and of its probability tables.

- ``rans_encode`` / ``rans_decode``: 64-bit state, 32-bit words, two interleaved states
  (F. Giesen's ryg_rans rans64); the decoder finds a state's symbol by a lookup table of
  the slot's top bits and a forward step while the slot lies past that symbol (a table of
  2**bits entries per table cost more to fill than a layer's symbols took to decode);
- ``build_tables``: every table of a stream in one call, with the float arithmetic of
  ``rangecoding.normalize`` / ``pair_table`` / ``frequencies`` (numpy's pairwise sum
  included), so the frequencies, hence the words, are those of the reference functions.

Compiled on first use and cached on disk (``cache=True``); imported only where symbols
are coded. Imports nothing of the project.
"""

from __future__ import annotations

import numba
import numpy as np

_L = 1 << 31  # the rANS state's lower bound (rans64)
# Counts are scaled to this total before they are shipped (``rangecoding.TABLE_TOTAL``).
TABLE_TOTAL = 1 << 15
# Frequency precision 2**bits: bits = clamp(ceil(log2(alphabet)) + EXTRA_BITS, MIN_BITS,
# MAX_BITS) (``rangecoding.table_bits``).
MIN_BITS, MAX_BITS, EXTRA_BITS = 10, 16, 6
# numpy's pairwise summation block (``PW_BLOCKSIZE`` of numpy's loops_utils).
_PW_BLOCK = 128


@numba.njit(cache=True, nogil=True)
def _block_sum(a, lo, n):  # pragma: no cover - jitted
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@numba.njit(cache=True, nogil=True)
def pairwise_sum(a, lo, n):  # pragma: no cover - jitted
    """numpy's ``add.reduce`` of float64 a[lo:lo + n] (contiguous), in its order: 8
    accumulators per block of <= 128, longer runs halved at a multiple of 8, the halves
    summed first (numpy recurses; this walks the same tree with a stack)."""
    if n <= _PW_BLOCK:
        return _block_sum(a, lo, n)
    s_lo = np.empty(64, np.int64)
    s_n = np.empty(64, np.int64)
    s_phase = np.zeros(64, np.int64)
    vals = np.empty(64, np.float64)
    sp = 1
    vt = 0
    s_lo[0] = lo
    s_n[0] = n
    s_phase[0] = 0
    while sp:
        t = sp - 1
        m = s_n[t]
        if m <= _PW_BLOCK:
            vals[vt] = _block_sum(a, s_lo[t], m)
            vt += 1
            sp -= 1
            continue
        n2 = m // 2
        n2 -= n2 % 8
        ph = s_phase[t]
        if ph < 2:
            s_phase[t] = ph + 1
            s_lo[sp] = s_lo[t] if ph == 0 else s_lo[t] + n2
            s_n[sp] = n2 if ph == 0 else m - n2
            s_phase[sp] = 0
            sp += 1
        else:
            vals[vt - 2] = vals[vt - 2] + vals[vt - 1]
            vt -= 1
            sp -= 1
    return vals[0]


@numba.njit(cache=True, nogil=True)
def _table_bits(k):  # pragma: no cover - jitted
    b = 0
    while (1 << b) < max(k, 2):
        b += 1
    return min(MAX_BITS, max(MIN_BITS, b + EXTRA_BITS))


@numba.njit(cache=True, nogil=True, error_model="numpy")  # float division as numpy's (0 / 0: NaN)
def build_tables(src, soff, paired, ship, shipped, freq, foff, cum, bits):  # pragma: no cover - jitted
    # table t's source counts src[soff[t]:soff[t + 1]] (k of them); ship: normalise them first
    # (``normalize``, written to shipped[soff[t]:...]); paired: the table of pairs (k * k
    # entries, ``pair_table``); then ``frequencies``: freq/cum[foff[t]:foff[t + 1]], bits[t].
    # Returns 0, or 1 when an alphabet exceeds 2**MAX_BITS.
    nt = len(soff) - 1
    kmax = 1
    for t in range(nt):
        k = soff[t + 1] - soff[t]
        kmax = max(kmax, k * k if paired[t] else k)
    p = np.empty(kmax, np.float64)
    c = np.empty(kmax, np.float64)
    for t in range(nt):
        s0 = soff[t]
        k = soff[t + 1] - s0
        for i in range(k):
            c[i] = np.float64(src[s0 + i])
        if ship:  # normalize: counts -> about TABLE_TOTAL, every entry >= 1
            tot = 0.0
            for i in range(k):
                tot += c[i]  # integers: exact in any order
            if tot == 0.0:
                tot = 1.0
            for i in range(k):
                v = np.floor(c[i] / tot * (TABLE_TOTAL - k)) + 1
                shipped[s0 + i] = np.uint16(v)
                c[i] = np.float64(np.uint16(v))
        if paired[t]:  # pair_table: p_i p_j with p = c / sum(c)
            tot = 0.0
            for i in range(k):
                tot += c[i]
            for i in range(k):
                c[i] = c[i] / tot
            kk = k * k
            for i in range(k):
                for j in range(k):
                    p[i * k + j] = c[i] * c[j]
        else:
            kk = k
            for i in range(k):
                p[i] = c[i]
        b = _table_bits(kk)
        m = 1 << b
        if kk > m:
            return 1
        bits[t] = b
        total = pairwise_sum(p, 0, kk)
        f0 = foff[t]
        best = 0
        fsum = 0.0
        for i in range(kk):
            v = (np.floor(p[i] / total * (m - kk)) if total > 0 else 0.0) + 1
            c[i] = v
            fsum += v
            if v > c[best]:
                best = i
        c[best] += m - fsum
        acc = np.uint32(0)
        for i in range(kk):
            f = np.uint32(c[i])
            freq[f0 + i] = f
            cum[f0 + i] = acc
            acc += f
    return 0


@numba.njit(cache=True, nogil=True)
def rans_encode(syms, starts, seg_table, freq, cum, bits, off, ksizes, out):  # pragma: no cover - jitted
    # two interleaved states (symbol i on state i % 2): the decoder's two dependency chains overlap
    lo = np.uint64(_L)
    word = np.uint64(0xFFFFFFFF)
    x0 = lo
    x1 = lo
    p = len(out)
    for i in range(len(starts) - 2, -1, -1):
        t = seg_table[i]
        o = off[t]
        k = ksizes[t]
        sb = np.uint64(bits[t])
        lim = (lo >> sb) << np.uint64(32)
        for j in range(starts[i + 1] - 1, starts[i] - 1, -1):
            s = syms[j]
            if s < 0 or s >= k:
                return -1
            f = np.uint64(freq[o + s])
            c = np.uint64(cum[o + s])
            if j & 1:
                if x1 >= lim * f:
                    p -= 1
                    out[p] = np.uint32(x1 & word)
                    x1 = x1 >> np.uint64(32)
                x1 = ((x1 // f) << sb) + (x1 % f) + c
            else:
                if x0 >= lim * f:
                    p -= 1
                    out[p] = np.uint32(x0 & word)
                    x0 = x0 >> np.uint64(32)
                x0 = ((x0 // f) << sb) + (x0 % f) + c
    p -= 4
    out[p] = np.uint32(x0 & word)
    out[p + 1] = np.uint32(x0 >> np.uint64(32))
    out[p + 2] = np.uint32(x1 & word)
    out[p + 3] = np.uint32(x1 >> np.uint64(32))
    return p


@numba.njit(cache=True, nogil=True)
def rans_decode(words, lens, seg_table, freq, cum, bits, off, lut_off, lut_shift, lut,
                out):  # pragma: no cover - jitted
    # lut[lut_off[t]:lut_off[t + 1]] (2**(bits[t] - lut_shift[t]) entries): the symbol holding
    # slot j << lut_shift[t]; a slot further into the next symbols steps forward to its own.
    n = len(words)
    if n < 4:
        return 1
    lo = np.uint64(_L)
    ntab = len(bits)
    for t in range(ntab):
        base = lut_off[t]
        sh = lut_shift[t]
        size = lut_off[t + 1] - base
        j = 0
        for s in range(off[t + 1] - off[t]):
            end = np.int64(cum[off[t] + s]) + np.int64(freq[off[t] + s])
            while j < size and (j << sh) < end:
                lut[base + j] = s
                j += 1
    x0 = np.uint64(words[0]) | (np.uint64(words[1]) << np.uint64(32))
    x1 = np.uint64(words[2]) | (np.uint64(words[3]) << np.uint64(32))
    p = 4
    k = 0
    for i in range(len(lens)):
        t = seg_table[i]
        o = off[t]
        sb = np.uint64(bits[t])
        mask = (np.uint64(1) << sb) - np.uint64(1)
        base = lut_off[t]
        sh = np.uint64(lut_shift[t])
        for _ in range(lens[i]):
            if k & 1:
                slot = x1 & mask
                s = np.int64(lut[base + np.int64(slot >> sh)])
                while slot - np.uint64(cum[o + s]) >= np.uint64(freq[o + s]):
                    s += 1
                x1 = np.uint64(freq[o + s]) * (x1 >> sb) + slot - np.uint64(cum[o + s])
                if x1 < lo:
                    if p >= n:
                        return 2
                    x1 = (x1 << np.uint64(32)) | np.uint64(words[p])
                    p += 1
            else:
                slot = x0 & mask
                s = np.int64(lut[base + np.int64(slot >> sh)])
                while slot - np.uint64(cum[o + s]) >= np.uint64(freq[o + s]):
                    s += 1
                x0 = np.uint64(freq[o + s]) * (x0 >> sb) + slot - np.uint64(cum[o + s])
                if x0 < lo:
                    if p >= n:
                        return 2
                    x0 = (x0 << np.uint64(32)) | np.uint64(words[p])
                    p += 1
            out[k] = s
            k += 1
    if p != n or x0 != lo or x1 != lo:
        return 3
    return 0
