"""numba kernels between quantised rows and the entropy coder's symbols (``cachegen``'s
streams): ``symbolize`` (rows sorted by table bucket, escapes, low bits cut off, pairs,
histograms, in one pass) and ``desymbolize`` (the reverse, straight into rows in their
order). ``cachegen_quant.to_streams`` / ``from_streams`` are the readable references.

Compiled on first use and cached on disk (``cache=True``); imports only ``lowbits_kernels``.
"""

from __future__ import annotations

import numba
import numpy as np

from kvtransfer.codecs.lowbits_kernels import _packed_size, offsets, pack_lows


@numba.njit(cache=True, nogil=True)
def symbolize_rows(rows, order, bstart, radius, split, ks, paired, coded, cstart, low, lstart, hist, hstart,
                   escapes):  # pragma: no cover - jitted
    # per bucket, in passes that vectorise: its rows gathered into one stream of value +
    # radius (a row holding an escape is redone value by value), low bits cut off,
    # the histogram (4 interleaved: a run of one symbol is not one add-to-memory chain), pairs
    n = rows.shape[1]
    ne = 0
    most = 0
    for i in range(len(radius)):
        most = max(most, (bstart[i + 1] - bstart[i]) * n)
    tmp = np.empty(most, np.int32)
    sub = np.zeros((4, int(np.max(ks)) if len(ks) else 1), np.int64)
    for i in range(len(radius)):
        rad = np.int32(radius[i])
        esc = np.int32(2 * radius[i] + 1)
        r = split[i]
        k = ks[i]
        total = (bstart[i + 1] - bstart[i]) * n
        q = 0
        for oi in range(bstart[i], bstart[i + 1]):
            row = rows[order[oi]]
            bad = 0
            for j in range(n):
                v = row[j]
                bad |= (v > rad) | (v < -rad)
                tmp[q + j] = v + rad
            if bad:
                for j in range(n):
                    v = row[j]
                    if v > rad or v < -rad:
                        escapes[ne] = v
                        ne += 1
                        tmp[q + j] = esc
            q += n
        if r:
            mask = np.int32((1 << r) - 1)
            l0 = lstart[i]
            for t in range(total):
                low[l0 + t] = tmp[t] & mask
                tmp[t] >>= r
        sub[:, :k] = 0
        t = 0
        while t + 4 <= total:
            sub[0, tmp[t]] += 1
            sub[1, tmp[t + 1]] += 1
            sub[2, tmp[t + 2]] += 1
            sub[3, tmp[t + 3]] += 1
            t += 4
        while t < total:
            sub[0, tmp[t]] += 1
            t += 1
        h = hstart[i]
        for s in range(k):
            hist[h + s] = sub[0, s] + sub[1, s] + sub[2, s] + sub[3, s]
        c0 = cstart[i]
        if paired[i]:
            half = total // 2
            kk = np.int32(k)
            for t in range(half):
                coded[c0 + t] = tmp[2 * t] * kk + tmp[2 * t + 1]
            if total & 1:
                coded[c0 + half] = tmp[total - 1] * kk
        else:
            for t in range(total):
                coded[c0 + t] = tmp[t]
    return ne


@numba.njit(cache=True, nogil=True)
def desymbolize_rows(flat, cstart, low, lstart, order, bstart, radius, split, kp, escapes, div, div_off,
                     out):  # pragma: no cover - jitted
    # per bucket, the inverse passes: pairs split (first symbol of a pair p is p // k =
    # div[div_off[k] + p], the second p - k (p // k); flat holds symbols < k * k of paired
    # tables, the rANS decoder's), low bits put back, rows scattered (value - radius; a row
    # holding an escape symbol is redone value by value, taking the escaped values in order)
    n = out.shape[1]
    e = 0
    most = 0
    for i in range(len(radius)):
        most = max(most, (bstart[i + 1] - bstart[i]) * n)
    tmp = np.empty(most + 1, np.int32)
    for i in range(len(radius)):
        rad = np.int32(radius[i])
        esc = np.int32(2 * radius[i] + 1)
        r = split[i]
        k = kp[i]
        c0 = cstart[i]
        total = (bstart[i + 1] - bstart[i]) * n
        if total == 0:
            continue
        if k:
            d0 = div_off[k]
            kk = np.int32(k)
            for t in range((total + 1) // 2):
                pv = flat[c0 + t]
                a = np.int32(div[d0 + pv])
                tmp[2 * t] = a
                tmp[2 * t + 1] = pv - a * kk
        else:
            for t in range(total):
                tmp[t] = flat[c0 + t]
        if r:
            l0 = lstart[i]
            for t in range(total):
                tmp[t] = (tmp[t] << r) + np.int32(low[l0 + t])
        q = 0
        for oi in range(bstart[i], bstart[i + 1]):
            row = out[order[oi]]
            bad = 0
            for j in range(n):
                s = tmp[q + j]
                bad |= s == esc
                row[j] = s - rad
            if bad:
                for j in range(n):
                    if tmp[q + j] == esc:
                        if e >= len(escapes):
                            return -1
                        row[j] = escapes[e]
                        e += 1
            q += n
    return e


@numba.njit(cache=True, nogil=True)
def row_buckets(rows, sums, has_sums, thresholds):  # pragma: no cover - jitted
    # bucket of each row by its mean |value| s (sums[r] / n, or counted): the number of
    # thresholds[1:] at or below s (thresholds[j] = 2**((j - OFFSET) / 2): the buckets of
    # ``cachegen_quant.buckets_of``, floor(2 log2 s) + OFFSET clipped; s is a ratio of
    # integers, never within rounding of a threshold unless equal to a power of two)
    R, n = rows.shape
    bk = np.zeros(R, np.uint8)
    if n == 0:
        return bk
    for r in range(R):
        if has_sums:
            tot = sums[r]
        else:
            tot = 0
            for j in range(n):
                tot += abs(np.int64(rows[r, j]))
        s = np.float64(tot) / n
        b = 0
        for j in range(1, len(thresholds)):
            if s >= thresholds[j]:
                b = j
        bk[r] = b
    return bk


@numba.njit(cache=True, nogil=True)
def symbolize_role(rows, sums, has_sums, thresholds, radius_b, split_b, k_b, pair_max):  # pragma: no cover
    # one role's rows [R, n] -> (bucket per row, used buckets, coded symbols, their length
    # per used bucket, packed low bits, histograms (k_b[used] entries each), escapes):
    # ``row_buckets``, a stable counting sort by bucket, ``symbolize_rows``, ``pack_lows``
    R, n = rows.shape
    nbk = len(radius_b)
    bk = row_buckets(rows, sums, has_sums, thresholds)
    counts = np.zeros(nbk, np.int64)
    for r in range(R):
        counts[bk[r]] += 1
    nu = 0
    for b in range(nbk):
        if counts[b]:
            nu += 1
    used = np.empty(nu, np.int64)
    start = np.zeros(nbk, np.int64)
    u = 0
    acc = 0
    for b in range(nbk):
        start[b] = acc
        acc += counts[b]
        if counts[b]:
            used[u] = b
            u += 1
    order = np.empty(R, np.int64)
    for r in range(R):
        order[start[bk[r]]] = r
        start[bk[r]] += 1
    radius = np.empty(nu, np.int64)
    split = np.empty(nu, np.int64)
    ks = np.empty(nu, np.int64)
    paired = np.empty(nu, np.bool_)
    bstart = np.zeros(nu + 1, np.int64)
    cstart = np.zeros(nu + 1, np.int64)
    lstart = np.zeros(nu + 1, np.int64)
    hstart = np.zeros(nu + 1, np.int64)
    ostart = np.zeros(nu + 1, np.int64)
    for i in range(nu):
        b = used[i]
        radius[i] = radius_b[b]
        split[i] = split_b[b]
        ks[i] = k_b[b]
        paired[i] = k_b[b] <= pair_max
        nb = counts[b] * n
        bstart[i + 1] = bstart[i] + counts[b]
        cstart[i + 1] = cstart[i] + ((nb + 1) // 2 if paired[i] else nb)
        lstart[i + 1] = lstart[i] + (nb if split[i] > 0 else 0)
        hstart[i + 1] = hstart[i] + ks[i]
        ostart[i + 1] = ostart[i] + _packed_size(nb, split[i])
    coded = np.empty(cstart[nu], np.int32)
    low = np.empty(lstart[nu], np.uint8)
    hist = np.zeros(hstart[nu], np.int64)
    escapes = np.empty(R * n, np.int32)
    ne = symbolize_rows(rows, order, bstart, radius, split, ks, paired, coded, cstart, low, lstart, hist, hstart,
                        escapes)
    packed = np.empty(ostart[nu], np.uint8)
    pack_lows(low, lstart, split, packed, ostart)
    lens = np.empty(nu, np.int64)
    for i in range(nu):
        lens[i] = cstart[i + 1] - cstart[i]
    return bk, used, coded, lens, packed, hist, escapes[:ne].copy()


@numba.njit(cache=True, nogil=True)
def desymbolize_role(flat, cstart, low, lstart, bk, used, radius_b, split_b, kp, escapes, div, div_off,
                     n):  # pragma: no cover - jitted
    # one role: rows [len(bk), n] from the decoded symbols of its used buckets (cstart /
    # lstart: their offsets, len(used) + 1; kp: pair alphabet per used bucket, 0 unpaired):
    # the stable counting sort of the rows by bucket, then ``desymbolize_rows``; returns
    # (rows, escapes taken or -1)
    R = len(bk)
    nbk = len(radius_b)
    counts = np.zeros(nbk, np.int64)
    for r in range(R):
        counts[bk[r]] += 1
    start = np.zeros(nbk, np.int64)
    acc = 0
    for b in range(nbk):
        start[b] = acc
        acc += counts[b]
    order = np.empty(R, np.int64)
    for r in range(R):
        order[start[bk[r]]] = r
        start[bk[r]] += 1
    nu = len(used)
    bstart = np.zeros(nu + 1, np.int64)
    radius = np.empty(nu, np.int64)
    split = np.empty(nu, np.int64)
    for i in range(nu):
        bstart[i + 1] = bstart[i] + counts[used[i]]
        radius[i] = radius_b[used[i]]
        split[i] = split_b[used[i]]
    out = np.empty((R, n), np.int32)
    e = desymbolize_rows(flat, cstart, low, lstart, order, bstart, radius, split, kp, escapes, div, div_off, out)
    return out, e


def pair_divisions(kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(div, div_off): div[div_off[k] + p] = p // k for p < k * k, k = 1..kmax (uint8)."""
    off = np.zeros(kmax + 2, np.int64)
    off[2:] = np.cumsum(np.arange(1, kmax + 1) ** 2)
    div = np.concatenate([np.arange(k * k) // k for k in range(1, kmax + 1)]).astype(np.uint8)
    return div, off[:kmax + 1].copy()


def symbolize(rows: np.ndarray, order: np.ndarray, counts: np.ndarray, radius: np.ndarray, split: np.ndarray,
              ks: np.ndarray, paired: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows of symbols [R, n] (int32), sorted by table bucket (``order``; counts: rows per
    used bucket, in order) -> per used bucket i: the coded symbols ``coded[cstart[i]:
    cstart[i + 1]]`` (value + radius, escapes as 2 radius + 1, the low ``split`` bits cut
    off, paired as a * k + b where ``paired``), the cut-off low bits ``low[lstart[i]:...]``
    (uint8), the histogram of the coded single symbols ``hist[hstart[i]:...]`` (ks[i]
    entries); and the escaped values in stream order (``cachegen_quant.to_streams`` +
    ``pair``): (coded, cstart, low, lstart, hist, hstart, escapes)."""
    n = rows.shape[1]
    nb = counts.astype(np.int64) * n
    cstart = offsets(np.where(paired, (nb + 1) // 2, nb))
    lstart = offsets(np.where(split > 0, nb, 0))
    hstart = offsets(ks)
    coded = np.empty(int(cstart[-1]), np.int32)
    low = np.empty(int(lstart[-1]), np.uint8)
    hist = np.zeros(int(hstart[-1]), np.int64)
    escapes = np.empty(rows.size, np.int32)  # pages are touched only where written (escapes are rare)
    ne = symbolize_rows(np.ascontiguousarray(rows, np.int32), order.astype(np.int64), offsets(counts),
                        radius.astype(np.int64), split.astype(np.int64), ks.astype(np.int64),
                        paired.astype(np.bool_), coded, cstart, low, lstart, hist, hstart, escapes)
    return coded, cstart, low, lstart, hist, hstart, escapes[:ne].copy()
