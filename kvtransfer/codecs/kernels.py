"""numba kernels of the lossy KV codecs' hot loops (``cachegen`` and ``kvtc``): one pass
where numpy and torch took several, single-threaded (a codec runs on one core).

- ``quantize``: CacheGen's quantiser (``cachegen_quant.quantize_reference`` is the
  readable torch version it equals) reading token-major KV (vectorised over channels),
  writing channel-major symbol rows, with each row's sum of |q| for the table buckets;
- ``reconstruct``: its inverse straight into token-major float32 (the same float32
  arithmetic as the encoder: every value within step / 2 of its input);
- ``rope``: RoPE on the keys of token-major KV in place (kvtc codes keys before RoPE);
- ``symbolize`` / ``desymbolize``: quantised rows to the entropy coder's symbols (sorted
  by table bucket, escapes, low bits cut off, pairs) and back;
- ``rans_encode`` / ``rans_decode``: the rANS coder of ``rangecoding``.

Compiled on first use (seconds) and cached on disk by numba (``cache=True``); this module
is imported only where symbols are coded (numba takes ~0.5 s to import).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

_QMAX = 2 ** 30
_L = 1 << 31  # the rANS state's lower bound (rans64)


@numba.njit(cache=True, nogil=True)
def quantize_tokens(z, delta, group, ref, mode, qa, qd, sa, sd):  # pragma: no cover - jitted
    # z: float32 [LK, T, C] token-major; rows r = lk * C + c of ref/mode/qa/qd/sa/sd
    LK, T, C = z.shape
    A = qa.shape[1]
    qmax = np.float32(_QMAX)
    s = np.empty(C, np.float64)
    refx = np.empty(C, np.float32)
    ahat = np.empty((max(A, 1), C), np.float32)
    base = np.empty(C, np.float32)
    ed = np.empty(C, np.float64)
    er = np.empty(C, np.float64)
    asum = np.empty(C, np.int64)
    dsum = np.empty(C, np.int64)
    dm = np.empty(C, np.bool_)
    for lk in range(LK):
        d = delta[lk]
        inv = np.float32(1.0) / d
        r0 = lk * C
        s[:] = 0.0
        for t in range(T):
            for c in range(C):
                s[c] += z[lk, t, c]
        for c in range(C):
            if not np.isfinite(s[c]):
                return 1
            m = np.float32(s[c] / T) if T else np.float32(0.0)
            rq = min(max(np.rint(m * inv), -qmax), qmax)
            ref[r0 + c] = np.int32(rq)
            refx[c] = np.float32(np.float32(rq) * d)
        ed[:] = 0.0
        er[:] = 0.0
        asum[:] = 0
        g = 0
        for t0 in range(0, T, group):
            for c in range(C):
                q = min(max(np.rint((z[lk, t0, c] - refx[c]) * inv), -qmax), qmax)
                qa[r0 + c, g] = np.int32(q)
                asum[c] += abs(np.int64(q))
                ahat[g, c] = np.float32(refx[c] + np.float32(np.float32(q) * d))
            for t in range(t0 + 1, min(t0 + group, T)):
                for c in range(C):
                    u = z[lk, t, c] - ahat[g, c]
                    w = z[lk, t, c] - refx[c]
                    ed[c] += u * u
                    er[c] += w * w
            g += 1
        for c in range(C):
            dm[c] = ed[c] < er[c]
            mode[r0 + c] = dm[c]
            sa[r0 + c] = asum[c]
        dsum[:] = 0
        j = 0
        g = 0
        for t0 in range(0, T, group):
            for c in range(C):
                base[c] = ahat[g, c] if dm[c] else refx[c]
            for t in range(t0 + 1, min(t0 + group, T)):
                for c in range(C):
                    q = min(max(np.rint((z[lk, t, c] - base[c]) * inv), -qmax), qmax)
                    qd[r0 + c, j] = np.int32(q)
                    dsum[c] += abs(np.int64(q))
                j += 1
            g += 1
        for c in range(C):
            sd[r0 + c] = dsum[c]
    return 0


@numba.njit(cache=True, nogil=True)
def reconstruct_rows(delta, ref, mode, qa, qd, group, out):  # pragma: no cover - jitted
    # out: float32 [LK, T, C] token-major; rows r = lk * C + c; inner loops over channels
    LK, T, C = out.shape
    refx = np.empty(C, np.float32)
    base = np.empty(C, np.float32)
    for lk in range(LK):
        d = delta[lk]
        r0 = lk * C
        for c in range(C):
            refx[c] = np.float32(np.float32(ref[r0 + c]) * d)
        for t0 in range(0, T, group):
            g = t0 // group
            j0 = g * (group - 1) - 1
            for c in range(C):
                a_hat = np.float32(np.float32(np.float32(qa[r0 + c, g]) * d) + refx[c])
                out[lk, t0, c] = a_hat
                base[c] = a_hat if mode[r0 + c] else refx[c]
            for i in range(1, min(group, T - t0)):
                for c in range(C):
                    out[lk, t0 + i, c] = np.float32(np.float32(np.float32(qd[r0 + c, j0 + i]) * d) + base[c])
    return 0


@numba.njit(cache=True, nogil=True)
def rope_rows(x, cos, sin):  # pragma: no cover - jitted
    # x: float32 [L, T, H, D] (keys), rotated in place by angle table cos/sin [T, D/2]
    L, T, H, D = x.shape
    half = D // 2
    for li in range(L):
        for t in range(T):
            for h in range(H):
                for i in range(half):
                    a = x[li, t, h, i]
                    b = x[li, t, h, i + half]
                    c = cos[t, i]
                    s = sin[t, i]
                    x[li, t, h, i] = a * c - b * s
                    x[li, t, h, i + half] = b * c + a * s
    return 0

@numba.njit(cache=True, nogil=True)
def symbolize_rows(rows, order, bstart, radius, split, ks, paired, coded, cstart, low, lstart, hist, hstart,
                   escapes):  # pragma: no cover - jitted
    n = rows.shape[1]
    ne = 0
    # 4 interleaved histograms: a run of one symbol (zeros) is not one long add-to-memory chain
    sub = np.zeros((4, int(np.max(ks)) if len(ks) else 1), np.int64)
    for i in range(len(radius)):
        rad = radius[i]
        r = split[i]
        k = ks[i]
        mask = (1 << r) - 1
        c = cstart[i]
        lo = lstart[i]
        h = hstart[i]
        pr = paired[i]
        half = False
        prev = 0
        sub[:, :k] = 0
        q = 0
        for oi in range(bstart[i], bstart[i + 1]):
            row = rows[order[oi]]
            for j in range(n):
                v = row[j]
                if v > rad or v < -rad:
                    escapes[ne] = v
                    ne += 1
                    sym = 2 * rad + 1
                else:
                    sym = v + rad
                if r:
                    low[lo] = sym & mask
                    lo += 1
                    sym >>= r
                sub[q & 3, sym] += 1
                q += 1
                if pr:
                    if half:
                        coded[c] = prev * k + sym
                        c += 1
                        half = False
                    else:
                        prev = sym
                        half = True
                else:
                    coded[c] = sym
                    c += 1
        if pr and half:
            coded[c] = prev * k
        for s in range(k):
            hist[h + s] = sub[0, s] + sub[1, s] + sub[2, s] + sub[3, s]
    return ne


@numba.njit(cache=True, nogil=True)
def desymbolize_rows(flat, cstart, low, lstart, order, bstart, radius, split, kp, escapes,
                     out):  # pragma: no cover - jitted
    n = out.shape[1]
    e = 0
    for i in range(len(radius)):
        rad = radius[i]
        r = split[i]
        k = kp[i]
        c0 = cstart[i]
        l0 = lstart[i]
        esc = 2 * rad + 1
        total = (bstart[i + 1] - bstart[i]) * n
        if total == 0:
            continue
        # the bucket's values in stream order: first symbol of a pair a = p // k, second p % k
        # (tables of both, no division per symbol)
        first = np.empty(max(k, 1) * max(k, 1), np.int64)
        second = np.empty(max(k, 1) * max(k, 1), np.int64)
        if k:
            for a in range(k):
                for b in range(k):
                    first[a * k + b] = a
                    second[a * k + b] = b
        oi = bstart[i]
        orow = order[oi]
        j = 0
        for idx in range(total):
            if k:
                pv = flat[c0 + (idx >> 1)]
                hi = first[pv] if (idx & 1) == 0 else second[pv]
            else:
                hi = np.int64(flat[c0 + idx])
            sym = hi << r
            if r:
                sym += low[l0 + idx]
            if sym == esc:
                if e >= len(escapes):
                    return -1
                out[orow, j] = escapes[e]
                e += 1
            else:
                out[orow, j] = sym - rad
            j += 1
            if j == n:
                j = 0
                oi += 1
                if oi < bstart[i + 1]:
                    orow = order[oi]
    return e


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
def rans_decode(words, lens, seg_table, freq, cum, bits, off, lut_off, out):  # pragma: no cover - jitted
    n = len(words)
    if n < 4:
        return 1
    lo = np.uint64(_L)
    ntab = len(bits)
    lut = np.empty(lut_off[ntab], np.uint16)
    for t in range(ntab):
        base = lut_off[t]
        for s in range(off[t + 1] - off[t]):
            c = base + np.int64(cum[off[t] + s])
            lut[c:c + np.int64(freq[off[t] + s])] = s
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
        for _ in range(lens[i]):
            if k & 1:
                slot = x1 & mask
                s = lut[base + np.int64(slot)]
                x1 = np.uint64(freq[o + s]) * (x1 >> sb) + slot - np.uint64(cum[o + s])
                if x1 < lo:
                    if p >= n:
                        return 2
                    x1 = (x1 << np.uint64(32)) | np.uint64(words[p])
                    p += 1
            else:
                slot = x0 & mask
                s = lut[base + np.int64(slot)]
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


def quantize(z: np.ndarray, delta: np.ndarray, group: int) -> tuple[np.ndarray, ...]:
    """z float32 [L, 2, T, C] token-major (contiguous), delta float32 [L, 2] -> (ref [L, 2,
    C], mode, qa [L, 2, C, A], qd [L, 2, C, T - A] channel-major, sum |qa| per row, sum |qd|
    per row); rows are (layer, K/V, channel)."""
    L, _, T, C = z.shape
    A = -(-T // group)
    R = L * 2 * C
    ref = np.empty(R, np.int32)
    mode = np.empty(R, np.bool_)
    qa = np.empty((R, A), np.int32)
    qd = np.empty((R, T - A), np.int32)
    sa = np.empty(R, np.int64)
    sd = np.empty(R, np.int64)
    err = quantize_tokens(z.reshape(L * 2, T, C), np.ascontiguousarray(delta, np.float32).reshape(-1), group,
                          ref, mode, qa, qd, sa, sd)
    if err:
        raise ValueError("the codec codes finite KV only; this tensor holds NaN or inf (use 'lossless')")
    return (ref.reshape(L, 2, C), mode.reshape(L, 2, C), qa.reshape(L, 2, C, A), qd.reshape(L, 2, C, T - A),
            sa, sd)


def symbolize(rows: np.ndarray, order: np.ndarray, counts: np.ndarray, radius: np.ndarray, split: np.ndarray,
              ks: np.ndarray, paired: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray],
                                                         np.ndarray]:
    """Rows of symbols [R, n] (int32), sorted by table bucket (``order``; counts: rows per
    used bucket, in order) -> per used bucket: the coded symbols (value + radius, escapes
    as 2 radius + 1, the low ``split`` bits cut off, paired as a * k + b where ``paired``),
    the cut-off low bits (uint8), the histogram of the coded single symbols (k entries);
    and the escaped values in stream order (``cachegen_quant.to_streams`` + ``pair``)."""
    n = rows.shape[1]
    nb = counts.astype(np.int64) * n
    clen = np.where(paired, (nb + 1) // 2, nb)
    cstart = np.zeros(len(nb) + 1, np.int64)
    np.cumsum(clen, out=cstart[1:])
    llen = np.where(split > 0, nb, 0)
    lstart = np.zeros(len(nb) + 1, np.int64)
    np.cumsum(llen, out=lstart[1:])
    hstart = np.zeros(len(nb) + 1, np.int64)
    np.cumsum(ks, out=hstart[1:])
    bstart = np.zeros(len(nb) + 1, np.int64)
    np.cumsum(counts, out=bstart[1:])
    coded = np.empty(int(cstart[-1]), np.int32)
    low = np.empty(int(lstart[-1]), np.uint8)
    hist = np.zeros(int(hstart[-1]), np.int64)
    escapes = np.empty(rows.size, np.int32)  # pages are touched only where written (escapes are rare)
    ne = symbolize_rows(np.ascontiguousarray(rows, np.int32), order.astype(np.int64), bstart,
                             radius.astype(np.int64), split.astype(np.int64), ks.astype(np.int64),
                             paired.astype(np.bool_), coded, cstart, low, lstart, hist, hstart, escapes)
    return ([coded[cstart[i]:cstart[i + 1]] for i in range(len(nb))],
            [low[lstart[i]:lstart[i + 1]] for i in range(len(nb))],
            [hist[hstart[i]:hstart[i + 1]] for i in range(len(nb))], escapes[:ne].copy())


def desymbolize(flat: np.ndarray, cstart: np.ndarray, lows: list[np.ndarray], order: np.ndarray,
                counts: np.ndarray, radius: np.ndarray, split: np.ndarray, kp: np.ndarray, escapes: np.ndarray,
                rows: int, n: int) -> np.ndarray:
    """Inverse of symbolize for one role: the decoded coded symbols of its used buckets
    (``flat[cstart[i]:cstart[i + 1]]``; kp[i] the pair alphabet, 0 unpaired), their
    unpacked low bits and the role's escaped values -> rows int32 [rows, n] in their
    original order. ValueError when the escapes do not match."""
    low = np.concatenate(lows) if lows else np.zeros(0, np.uint8)
    lstart = np.zeros(len(lows) + 1, np.int64)
    np.cumsum([len(x) for x in lows], out=lstart[1:])
    bstart = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=bstart[1:])
    out = np.empty((rows, n), np.int32)
    if bstart[-1] != rows:
        raise ValueError(f"{int(bstart[-1])} rows in the buckets for {rows} rows")
    e = desymbolize_rows(flat, np.asarray(cstart, np.int64), low, lstart, order.astype(np.int64), bstart,
                              radius.astype(np.int64), split.astype(np.int64), kp.astype(np.int64),
                              np.ascontiguousarray(escapes, np.int32), out)
    if e != len(escapes):
        raise ValueError(f"{max(e, 0) if e >= 0 else 'more'} escape symbols but {len(escapes)} escaped values")
    return out


def reconstruct(delta: np.ndarray, ref: np.ndarray, mode: np.ndarray, qa: np.ndarray, qd: np.ndarray,
                tokens: int, group: int) -> torch.Tensor:
    """Inverse of quantize, token-major: float32 [L, 2, T, C]."""
    L, _, C = ref.shape
    out = np.empty((L * 2, tokens, C), np.float32)
    R = L * 2 * C
    reconstruct_rows(np.ascontiguousarray(delta, np.float32).reshape(-1), ref.reshape(R), mode.reshape(R),
                     qa.reshape(R, qa.shape[-1]), qd.reshape(R, qd.shape[-1]), group, out)
    return torch.from_numpy(out).view(L, 2, tokens, C)


def rope_tables(first_pos: int, tokens: int, inv_freq: np.ndarray, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sign * sin [tokens, D / 2] (float32, angles in float64), as ``rope_keys``."""
    pos = np.arange(first_pos, first_pos + tokens, dtype=np.float64)
    ang = pos[:, None] * np.asarray(inv_freq, np.float32).astype(np.float64)[None, :]
    return np.cos(ang).astype(np.float32), (sign * np.sin(ang)).astype(np.float32)


def rope_(keys: np.ndarray, first_pos: int, inv_freq: np.ndarray, sign: float) -> None:
    """Keys float32 [L, T, H, D] (a numpy view, may be strided) rotated in place: RoPE at
    positions first_pos.. (sign 1) or back (sign -1), HF rotate_half layout."""
    if len(inv_freq) != keys.shape[3] // 2:
        raise ValueError(f"{len(inv_freq)} RoPE frequencies for head_dim {keys.shape[3]}")
    cos, sin = rope_tables(first_pos, keys.shape[1], inv_freq, sign)
    rope_rows(keys, cos, sin)
