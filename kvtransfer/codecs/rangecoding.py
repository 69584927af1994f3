"""Entropy coding of symbol streams with explicit probability tables (``constriction``'s
ANS coder: an arithmetic coder like a range coder, about 10% faster to decode).

A stream is a list of symbol arrays, each coded with one table (a probability vector);
several arrays may share a table. Encoder and decoder derive the tables from the same
integer counts with the same float operations, so the models are identical.
One ``encode`` call per array keeps the Python overhead at a few microseconds per array:
callers group symbols that share a table into one array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Counts are scaled to this total before they are shipped as uint16 (and before use, so
# that a shipped table and a fresh one code identically).
TABLE_TOTAL = 1 << 15


def _model(table: np.ndarray) -> object:
    import constriction  # type: ignore[import-untyped]

    probs = np.asarray(table, dtype=np.float64)
    return constriction.stream.model.Categorical(probs / probs.sum(), perfect=False)


def pair_table(counts: np.ndarray) -> np.ndarray:
    """Table of pairs (s1 * K + s2) of independent symbols with these counts."""
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum()
    out: np.ndarray = np.outer(p, p).reshape(-1)
    return out


def pair(symbols: np.ndarray, k: int) -> np.ndarray:
    """Symbols < k two by two into symbols < k*k (a trailing odd one paired with 0):
    half the coder calls, which bound the speed."""
    if len(symbols) % 2:
        symbols = np.append(symbols, 0)
    out: np.ndarray = symbols[0::2] * k + symbols[1::2]
    return out.astype(np.int32)


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


def encode(arrays: Sequence[np.ndarray], table_of: Sequence[int], tables: Sequence[np.ndarray]) -> np.ndarray:
    """Code arrays[i] (int32 symbols < len(tables[table_of[i]])) with that table (counts
    or probabilities); returns the compressed uint32 words."""
    import constriction  # type: ignore[import-untyped]

    enc = constriction.stream.stack.AnsCoder()  # a stack: encode last array first
    models: dict[int, object] = {}
    for arr, t in reversed(list(zip(arrays, table_of))):
        if len(arr) == 0:
            continue
        if t not in models:
            models[t] = _model(tables[t])
        enc.encode_reverse(np.ascontiguousarray(arr, dtype=np.int32), models[t])
    out: np.ndarray = enc.get_compressed()
    return out


def decode(words: np.ndarray, sizes: Sequence[int], table_of: Sequence[int],
           tables: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Inverse of encode: arrays of the given sizes."""
    import constriction  # type: ignore[import-untyped]

    dec = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    models: dict[int, object] = {}
    out = []
    for n, t in zip(sizes, table_of):
        if n == 0:
            out.append(np.zeros(0, np.int32))
            continue
        if t not in models:
            models[t] = _model(tables[t])
        out.append(dec.decode(models[t], int(n)))
    if not dec.is_empty():  # a stack coder ends where the encoder started: anything else is a bad stream
        raise ValueError("ANS words do not decode to exactly these symbols (truncated or altered stream)")
    return out
