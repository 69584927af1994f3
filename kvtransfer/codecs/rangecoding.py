"""Entropy coding of symbol streams with explicit probability tables: rANS (asymmetric
numeral systems, J. Duda 2013; the 64-bit-state, 32-bit-word variant of F. Giesen's
ryg_rans; two interleaved states), compiled with numba, with a lookup-table decoder.

A stream is a list of symbol arrays, each coded with one table (counts or probabilities
over its alphabet); several arrays may share a table. Encoder and decoder quantise each
table to integer frequencies summing to 2**bits with the same float operations
(``frequencies``), so the models are identical. Decoding a symbol is a table lookup of
the state's low bits (the top ones of them: a table has 2+ entries per symbol, not
2**bits, so that filling it costs less than a layer's symbols take to decode; a slot past
the entry's symbol steps forward, ~0.25 steps on average), a multiply and an occasional
32-bit read: a few ns whatever the alphabet (constriction's categorical decoder, used
before, searched the CDF: ~10 ns a call plus ~2 ns per bit of the alphabet).

The codecs build every table of a stream in one kernel call (``build``: the float
arithmetic of ``normalize``, ``pair_table`` and ``frequencies``, which stay the readable
reference) and code with the prepared tables (``encode_prepared``, ``decode_prepared``).

The words end with a check: the decoder must finish exactly at the end of the words in
the encoder's initial state, else the stream was truncated or altered (``ValueError``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

# Counts are scaled to this total before they are shipped as uint16 (and before use, so
# that a shipped table and a fresh one code identically).
TABLE_TOTAL = 1 << 15
# Frequency precision of a table: 2**bits with bits = clamp(ceil(log2(alphabet)) + 6, 10,
# 16); the decoder's lookup table has 2**bits entries.
MIN_BITS, MAX_BITS, EXTRA_BITS = 10, 16, 6


def pair_table(counts: np.ndarray) -> np.ndarray:
    """Table of pairs (s1 * K + s2) of independent symbols with these counts."""
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum()
    out: np.ndarray = np.outer(p, p).reshape(-1)
    return out


def pair(symbols: np.ndarray, k: int) -> np.ndarray:
    """Symbols < k two by two into symbols < k*k (a trailing odd one paired with 0):
    half the coder steps."""
    if len(symbols) % 2:
        symbols = np.append(symbols, 0)
    out = np.multiply(symbols[0::2], k, dtype=np.int32)
    out += symbols[1::2]
    return out


def unpair(pairs: np.ndarray, k: int, n: int) -> np.ndarray:
    out = np.empty(2 * len(pairs), np.int32)
    out[0::2], out[1::2] = np.divmod(pairs, k)
    return out[:n]


def normalize(counts: np.ndarray) -> np.ndarray:
    """Integer counts -> uint16 rows summing to about TABLE_TOTAL, every entry >= 1 (so
    that any symbol stays codable, e.g. one never seen while calibrating)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(axis=-1, keepdims=True)
    total[total == 0] = 1
    k = c.shape[-1]
    scaled = np.floor(c / total * (TABLE_TOTAL - k)) + 1
    return scaled.astype(np.uint16)


def table_bits(k: int) -> int:
    return int(min(MAX_BITS, max(MIN_BITS, int(np.ceil(np.log2(max(k, 2)))) + EXTRA_BITS)))


def frequencies(table: np.ndarray) -> tuple[np.ndarray, int]:
    """A table (counts or probabilities, k entries) -> (uint32 frequencies, each >= 1,
    summing to exactly 2**bits; bits)."""
    p = np.asarray(table, dtype=np.float64)
    k = len(p)
    bits = table_bits(k)
    m = 1 << bits
    if k > m:
        raise ValueError(f"alphabet of {k} symbols exceeds the coder's 2**{MAX_BITS} precision")
    total = p.sum()
    f = (np.floor(p / total * (m - k)) if total > 0 else np.zeros(k)) + 1
    f[int(np.argmax(f))] += m - f.sum()
    return f.astype(np.uint32), bits


def _prepare(table_of: Sequence[int], tables: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The used tables' frequencies, cumulative starts, bits and offsets, concatenated;
    and each array's index into them."""
    used: dict[int, int] = {}
    freqs, bits = [], []
    for t in table_of:
        if t not in used:
            used[t] = len(freqs)
            f, b = frequencies(tables[t])
            freqs.append(f)
            bits.append(b)
    sizes = np.array([len(f) for f in freqs], np.int64)
    off = np.zeros(len(freqs) + 1, np.int64)
    np.cumsum(sizes, out=off[1:])
    freq = np.concatenate(freqs) if freqs else np.zeros(0, np.uint32)
    cum = np.empty_like(freq)
    for i, f in enumerate(freqs):
        c = np.cumsum(f, dtype=np.uint32)
        cum[off[i]:off[i + 1]] = c - f
    seg_table = np.array([used[t] for t in table_of], np.int64)
    return freq, cum, np.array(bits, np.int64), off, sizes, seg_table


def encode(arrays: Sequence[np.ndarray], table_of: Sequence[int], tables: Sequence[np.ndarray]) -> np.ndarray:
    """Code arrays[i] (int32 symbols < len(tables[table_of[i]])) with that table (counts
    or probabilities); returns the compressed uint32 words."""
    freq, cum, bits, off, _, seg_table = _prepare(table_of, tables)
    lens = np.array([len(a) for a in arrays], np.int64)
    syms = (np.concatenate([np.asarray(a, np.int32) for a in arrays]) if len(arrays) > 1 else
            np.ascontiguousarray(arrays[0], np.int32) if arrays else np.zeros(0, np.int32))
    return encode_prepared(syms, lens, seg_table, (freq, cum, bits, off))


def decode(words: np.ndarray, sizes: Sequence[int], table_of: Sequence[int],
           tables: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Inverse of encode: arrays of the given sizes (int32 views of one buffer)."""
    out, bounds = decode_flat(words, sizes, table_of, tables)
    return [out[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def decode_flat(words: np.ndarray, sizes: Sequence[int], table_of: Sequence[int],
                tables: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """decode's arrays as one int32 buffer and the start of each (plus the end)."""
    freq, cum, bits, off, _, seg_table = _prepare(table_of, tables)
    lens = np.asarray(sizes, np.int64)
    out = decode_prepared(words, lens, seg_table, (freq, cum, bits, off))
    bounds = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=bounds[1:])
    return out, bounds


# -- prepared tables: what the codecs use (every table of a stream built in one call) ------
# (freq uint32, cum uint32, bits int64 per table, off int64: table t is [off[t], off[t + 1]))
Prepared = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def build(src: np.ndarray, soff: np.ndarray, paired: np.ndarray, ship: bool) -> tuple[np.ndarray, Prepared]:
    """Every table of a stream at once: table t from the counts src[soff[t]:soff[t + 1]]
    (``ship``: ``normalize``d first; ``paired``: the ``pair_table`` of them), quantised
    by ``frequencies``; bit-identical to those functions. Returns (the normalised counts
    when ship, else an empty array; the prepared tables)."""
    soff = np.ascontiguousarray(soff, np.int64)
    paired = np.ascontiguousarray(paired, np.bool_)
    k = np.diff(soff)
    sizes = np.where(paired, k * k, k)
    off = np.zeros(len(k) + 1, np.int64)
    np.cumsum(sizes, out=off[1:])
    freq = np.empty(int(off[-1]), np.uint32)
    cum = np.empty(int(off[-1]), np.uint32)
    bits = np.empty(len(k), np.int64)
    shipped = np.empty(len(src) if ship else 0, np.uint16)
    err = _kernels().build_tables(np.ascontiguousarray(src), soff, paired, ship, shipped, freq, off, cum, bits)
    if err:
        raise ValueError(f"an alphabet exceeds the coder's 2**{MAX_BITS} precision")
    return shipped, (freq, cum, bits, off)


def encode_prepared(syms: np.ndarray, lens: np.ndarray, seg_table: np.ndarray, tables: Prepared) -> np.ndarray:
    """Code the segments of syms (int32; segment i: the next lens[i] symbols) with the
    prepared table seg_table[i]; the compressed uint32 words."""
    freq, cum, bits, off = tables
    starts = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=starts[1:])
    out = np.empty(len(syms) + 4, np.uint32)
    p = _kernels().rans_encode(np.ascontiguousarray(syms, np.int32), starts, np.asarray(seg_table, np.int64), freq,
                               cum, bits, off, np.diff(off), out)
    if p < 0:
        raise ValueError("a symbol is outside its table's alphabet")
    return out[p:]


def decode_prepared(words: np.ndarray, lens: np.ndarray, seg_table: np.ndarray, tables: Prepared) -> np.ndarray:
    """Inverse of encode_prepared: the symbols of every segment, one int32 buffer."""
    freq, cum, bits, off = tables
    lens = np.asarray(lens, np.int64)
    seg_table = np.asarray(seg_table, np.int64)
    shift = lut_shifts(bits, np.diff(off), np.bincount(seg_table, weights=lens, minlength=len(bits)))
    lut_off = np.zeros(len(bits) + 1, np.int64)
    np.cumsum(np.left_shift(1, bits - shift), out=lut_off[1:])
    out = np.empty(int(lens.sum()), np.int32)
    err = _kernels().rans_decode(np.ascontiguousarray(words, np.uint32), lens, seg_table, freq, cum, bits, off,
                                 lut_off, shift, _scratch(int(lut_off[-1])), out)
    if err:
        raise ValueError("rANS words do not decode to exactly these symbols (truncated or altered stream)")
    return out


def lut_shifts(bits: np.ndarray, ksizes: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    """The decoder's lookup table of table t covers slots in steps of 2**shift[t]: at
    least 2 entries per symbol of the alphabet (a slot steps past 0.25 symbols on average),
    more where many symbols are decoded with it (up to one per slot: no steps)."""
    want = np.maximum(_ceil_log2(ksizes) + 1, _ceil_log2(np.asarray(symbols, np.int64) + 1) - 2)
    return np.asarray(bits, np.int64) - np.clip(want, MIN_BITS, bits)


def _ceil_log2(x: np.ndarray) -> np.ndarray:
    x = np.maximum(np.asarray(x, np.int64), 1)
    return np.ceil(np.log2(x)).astype(np.int64)


_LOCAL = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A uint16 buffer of n entries owned by this thread (the decoder's lookup tables: no
    fresh pages per call; bounded by the largest stream's tables)."""
    buf = getattr(_LOCAL, "lut", None)
    if buf is None or len(buf) < n:
        buf = _LOCAL.lut = np.empty(max(n, 1 << 16), np.uint16)
    return buf


def _kernels() -> Any:
    from kvtransfer.codecs import rans_kernels  # numba: imported where symbols are coded

    return rans_kernels
