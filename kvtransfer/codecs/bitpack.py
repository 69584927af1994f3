"""Dense packing of small unsigned ints (numpy, vectorised): ``pack(v, bits)`` and
``unpack(buf, bits, n)`` for widths 1..8.

Widths 4 and 2 pack two / four values per byte (first value in the lowest bits), through
16- and 32-bit views; width 8 is the bytes themselves; other widths are stored as bit
planes (plane j holds bit j of every value, ``np.packbits``): one fast pass per bit
instead of shuffling words.
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
    return np.concatenate([np.packbits(v & np.uint8(1 << j)) for j in range(bits)])


def unpack(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack: the first n values (uint8, a fresh writable array)."""
    if len(buf) != packed_size(n, bits):
        raise ValueError(f"{bits}-bit stream of {n} values needs {packed_size(n, bits)} bytes, got {len(buf)}")
    if bits == 8:
        return np.array(buf, dtype=np.uint8)
    if bits == 4:
        w = buf.astype(np.uint16)
        spread: np.ndarray = (w & 15) | ((w >> 4) << 8)
        return spread.view(np.uint8)[:n]
    if bits == 2:
        return _SPREAD2[buf].view(np.uint8)[:n]
    plane = (n + 7) // 8
    out = np.unpackbits(buf[:plane], count=n)
    for j in range(1, bits):
        bit = np.unpackbits(buf[j * plane:(j + 1) * plane], count=n)
        bit <<= j
        out |= bit
    return out
