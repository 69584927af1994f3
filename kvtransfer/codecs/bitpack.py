"""Dense packing of small unsigned ints (numpy, vectorised): ``pack(v, bits)`` and
``unpack(buf, bits, n)`` for widths 1..8.

Widths 4 and 2 pack two / four values per byte (first value in the lowest bits), through
16- and 32-bit views; width 8 is the bytes themselves; width 6 is stored as quarters: the
values, padded to 4 Q (Q a multiple of 8), are cut into four contiguous quarters A, B, C,
D of Q values, and
byte i of plane j (j = 0, 1, 2) holds the value of quarter j in its low 6 bits and bits
2j..2j+1 of D[i] in its top 2 (contiguous slices only: a few byte-wide passes); other
widths are stored as bit planes (plane j holds bit j of every value, ``np.packbits``):
one fast pass per bit instead of shuffling words.
"""

from __future__ import annotations

import numpy as np


# Byte -> its four 2-bit fields, one per byte of a little-endian uint32.
_SPREAD2 = np.zeros(256, np.uint32)
for _j in range(4):
    _SPREAD2 |= ((np.arange(256, dtype=np.uint32) >> (2 * _j)) & 3) << (8 * _j)


def packed_size(n: int, bits: int) -> int:
    """Bytes that pack(v, bits) writes for n values."""
    if bits == 8:
        return n
    if bits == 4:
        return (n + 1) // 2
    if bits == 2:
        return (n + 3) // 4
    if bits == 6:
        return 3 * _quarter(n)
    return bits * ((n + 7) // 8)


def pack(v: np.ndarray, bits: int) -> np.ndarray:
    """v: uint8 values < 2**bits -> uint8 array of packed_size(len(v), bits) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    v = np.ascontiguousarray(v, dtype=np.uint8)
    if bits == 8:
        return v
    if bits == 4:
        if len(v) % 2:
            v = np.concatenate([v, np.zeros(1, np.uint8)])
        w = v.view(np.uint16)  # little-endian: first value in the low byte
        out: np.ndarray = ((w >> 4) | w).astype(np.uint8)
        return out
    if bits == 2:
        if len(v) % 4:
            v = np.concatenate([v, np.zeros(4 - len(v) % 4, np.uint8)])
        w32 = v.view(np.uint32)
        acc = w32 >> 6
        acc |= w32
        acc |= w32 >> 12
        acc |= w32 >> 18
        out = acc.astype(np.uint8)
        return out
    if bits == 6:
        return _pack6(v)
    return np.concatenate([np.packbits(v & np.uint8(1 << j)) for j in range(bits)])


def unpack(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack: the first n values (uint8, a fresh writable array)."""
    if len(buf) != packed_size(n, bits):
        raise ValueError(f"{bits}-bit stream of {n} values needs {packed_size(n, bits)} bytes, got {len(buf)}")
    if bits == 8:
        return np.array(buf, dtype=np.uint8)
    if bits == 4:
        w = buf.astype(np.uint16)
        spread = np.left_shift(w, 4)
        spread |= w
        spread &= np.uint16(0x0F0F)
        out: np.ndarray = spread.view(np.uint8)[:n]
        return out
    if bits == 2:
        return _SPREAD2[buf].view(np.uint8)[:n]
    if bits == 6:
        return _unpack6(buf, n)
    plane = (n + 7) // 8
    out = np.unpackbits(buf[:plane], count=8 * plane)  # whole uint64 words: shifts on 8 lanes at once
    if bits > 1:
        acc, bit = _u64(out), np.empty(plane, np.uint64)
        for j in range(1, bits):
            np.left_shift(_u64(np.unpackbits(buf[j * plane:(j + 1) * plane])), np.uint64(j), out=bit)
            acc |= bit
    return out[:n]


# Byte masks for SWAR passes over uint64 views (numpy has no vectorised 8-bit left shift).
_B = 0x0101010101010101


def _u64(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint64)


def _quarter(n: int) -> int:
    """Values per quarter of the 6-bit layout: n / 4 rounded up to whole uint64 words."""
    return -(-n // 32) * 8


def _pack6(v: np.ndarray) -> np.ndarray:
    q = _quarter(len(v))
    if len(v) != 4 * q:
        v = np.concatenate([v, np.zeros(4 * q - len(v), np.uint8)])
    d = _u64(v[3 * q:])
    out = np.empty(3 * q, np.uint8)
    tmp = np.empty(q // 8, np.uint64)
    for j in range(3):
        np.left_shift(d, np.uint64(6 - 2 * j), out=tmp)
        np.bitwise_and(tmp, np.uint64(0xC0 * _B), out=tmp)
        np.bitwise_or(_u64(v[j * q:(j + 1) * q]), tmp, out=_u64(out[j * q:(j + 1) * q]))
    return out


def _unpack6(buf: np.ndarray, n: int) -> np.ndarray:
    q = len(buf) // 3
    if buf.ctypes.data % 8:
        buf = buf.copy()  # uint64 views want an aligned start
    out = np.empty(4 * q, np.uint8)
    d = _u64(out[3 * q:])
    tmp = np.empty(q // 8, np.uint64)
    for j in range(3):
        p = _u64(buf[j * q:(j + 1) * q])
        np.bitwise_and(p, np.uint64(0x3F * _B), out=_u64(out[j * q:(j + 1) * q]))
        np.right_shift(p, np.uint64(6 - 2 * j), out=tmp)
        np.bitwise_and(tmp, np.uint64((3 << 2 * j) * _B), out=tmp)
        if j:
            np.bitwise_or(d, tmp, out=d)
        else:
            d[:] = tmp
    return out[:n]
