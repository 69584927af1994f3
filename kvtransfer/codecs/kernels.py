"""numba kernels of the lossy KV codecs' hot loops (``cachegen`` and ``kvtc``): one pass
where numpy and torch took several, single-threaded (a codec runs on one core).

- ``quantize``: CacheGen's quantiser (``cachegen_quant.quantize_reference`` is the
  readable torch version it equals) reading token-major KV (vectorised over channels),
  writing channel-major symbol rows, with each row's sum of |q| for the table buckets;
- ``reconstruct``: its inverse straight into token-major float32 (the same float32
  arithmetic as the encoder: every value within step / 2 of its input);
- ``rope``: RoPE on the keys of token-major KV in place (kvtc codes keys before RoPE),
  the angle tables of a (position, length, frequencies, direction) cached: the layers of
  one chunk share them.

The entropy stage's kernels are in ``symbol_kernels`` and ``rans_kernels``. Compiled on
first use (seconds) and cached on disk by numba (``cache=True``); this module is imported
only where symbols are coded (numba takes ~0.5 s to import).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

_QMAX = 2 ** 30
# Angle tables kept (``rope_tables``): a few chunks' positions in flight, ~130 KB each at
# 512 tokens x 32 frequencies.
ROPE_CACHE = 32


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
    """cos and sign * sin [tokens, D / 2] (float32, angles in float64), as ``rope_keys``;
    read-only arrays, cached by (first_pos, tokens, the float32 frequencies, sign)."""
    return _rope_tables(int(first_pos), int(tokens), np.asarray(inv_freq, np.float32).tobytes(), float(sign))


@functools.lru_cache(maxsize=ROPE_CACHE)
def _rope_tables(first_pos: int, tokens: int, inv_freq: bytes, sign: float) -> tuple[np.ndarray, np.ndarray]:
    pos = np.arange(first_pos, first_pos + tokens, dtype=np.float64)
    ang = pos[:, None] * np.frombuffer(inv_freq, np.float32).astype(np.float64)[None, :]
    cos, sin = np.cos(ang).astype(np.float32), (sign * np.sin(ang)).astype(np.float32)
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


def rope_(keys: np.ndarray, first_pos: int, inv_freq: np.ndarray, sign: float) -> None:
    """Keys float32 [L, T, H, D] (a numpy view, may be strided) rotated in place: RoPE at
    positions first_pos.. (sign 1) or back (sign -1), HF rotate_half layout."""
    if len(inv_freq) != keys.shape[3] // 2:
        raise ValueError(f"{len(inv_freq)} RoPE frequencies for head_dim {keys.shape[3]}")
    cos, sin = rope_tables(first_pos, keys.shape[1], inv_freq, sign)
    rope_rows(keys, cos, sin)
