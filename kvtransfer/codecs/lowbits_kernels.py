"""numba kernels of the raw low bits of wide table buckets (``cachegen_symbols``): every
bucket's bits packed one after another exactly as ``bitpack.pack`` packs each (bit planes,
2-, 4- and 6-bit layouts), and unpacked. Imports nothing of the project.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def pack_lows(low, lstart, split, out, ostart):  # pragma: no cover - jitted
    # the low bits of bucket i (low[lstart[i]:lstart[i + 1]], values < 2**split[i]) packed as
    # ``bitpack.pack(v, split[i])`` into out[ostart[i]:ostart[i + 1]] (split 1..7)
    for i in range(len(split)):
        r = split[i]
        if r == 0:
            continue
        v = low[lstart[i]:lstart[i + 1]]
        o = out[ostart[i]:ostart[i + 1]]
        n = len(v)
        o[:] = 0
        if r == 2:
            for j in range(n):
                o[j >> 2] |= v[j] << (2 * (j & 3))
        elif r == 4:
            for j in range(n):
                o[j >> 1] |= v[j] << (4 * (j & 1))
        elif r == 6:
            q = len(o) // 3
            for j in range(min(n, 3 * q)):
                o[j] = v[j]
            for k in range(q):
                d = v[3 * q + k] if 3 * q + k < n else 0
                for j in range(3):
                    o[j * q + k] |= ((d >> (2 * j)) & 3) << 6
        else:  # bit planes, most significant bit first (np.packbits)
            plane = (n + 7) // 8
            for b in range(r):
                for j in range(n):
                    o[b * plane + (j >> 3)] |= ((v[j] >> b) & 1) << (7 - (j & 7))
    return 0


@numba.njit(cache=True, nogil=True)
def unpack_lows(buf, ostart, split, low, lstart):  # pragma: no cover - jitted
    # inverse of pack_lows: bucket i's packed bits buf[ostart[i]:ostart[i + 1]] -> low[lstart[i]:...]
    for i in range(len(split)):
        r = split[i]
        if r == 0:
            continue
        o = buf[ostart[i]:ostart[i + 1]]
        v = low[lstart[i]:lstart[i + 1]]
        n = len(v)
        if r == 2:
            for j in range(n):
                v[j] = (o[j >> 2] >> (2 * (j & 3))) & 3
        elif r == 4:
            for j in range(n):
                v[j] = (o[j >> 1] >> (4 * (j & 1))) & 15
        elif r == 6:
            q = len(o) // 3
            for j in range(min(n, 3 * q)):
                v[j] = o[j] & 63
            for k in range(q):
                if 3 * q + k < n:
                    v[3 * q + k] = ((o[k] >> 6) | ((o[q + k] >> 6) << 2) | ((o[2 * q + k] >> 6) << 4))
        else:
            plane = (n + 7) // 8
            for j in range(n):
                acc = 0
                for b in range(r):
                    acc |= ((o[b * plane + (j >> 3)] >> (7 - (j & 7))) & 1) << b
                v[j] = acc
    return 0


@numba.njit(cache=True, nogil=True)
def _packed_size(n, r):  # pragma: no cover - jitted
    if r == 0:
        return 0
    if r == 2:
        return (n + 3) // 4
    if r == 4:
        return (n + 1) // 2
    if r == 6:
        return 3 * (((n + 31) // 32) * 8)
    if r == 8:
        return n
    return r * ((n + 7) // 8)


@numba.njit(cache=True, nogil=True)
def packed_sizes_of(n, r):  # pragma: no cover - jitted
    out = np.empty(len(n), np.int64)
    for i in range(len(n)):
        out[i] = _packed_size(n[i], r[i])
    return out


def offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def pack(low: np.ndarray, lstart: np.ndarray, split: np.ndarray) -> np.ndarray:
    """The low bits of every bucket (``low[lstart[i]:lstart[i + 1]]``, split[i] bits, 0:
    none) packed one after another as ``bitpack.pack`` packs each (uint8)."""
    ostart = offsets(packed_sizes_of(np.diff(lstart).astype(np.int64), np.asarray(split, np.int64)))
    out = np.empty(int(ostart[-1]), np.uint8)
    pack_lows(low, np.asarray(lstart, np.int64), np.asarray(split, np.int64), out, ostart)
    return out


def unpack(buf: np.ndarray, n: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack given each bucket's value count n: (low, lstart). ValueError when
    buf is not exactly as long as they need."""
    split = np.asarray(split, np.int64)
    ostart = offsets(packed_sizes_of(np.asarray(n, np.int64), split))
    if ostart[-1] > len(buf):
        raise ValueError(f"low-bits section is {len(buf)} bytes, the streams need more")
    if ostart[-1] != len(buf):
        raise ValueError(f"low-bits section is {len(buf)} bytes, the streams need {int(ostart[-1])}")
    lstart = offsets(np.where(split > 0, n, 0))
    low = np.empty(int(lstart[-1]), np.uint8)
    unpack_lows(buf, ostart, split, low, lstart)
    return low, lstart
