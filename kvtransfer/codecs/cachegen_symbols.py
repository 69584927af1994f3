"""The entropy stage of ``cachegen`` streams (``kvtc``'s too): quantised rows of the three
roles (anchor symbols, other tokens' symbols, channel means) <-> the sections ``buckets``,
``tables``, ``escapes``, ``low`` and ``words`` (``cachegen_format``).

Each row picks a table bucket by its spread (shipped, 5 bits a row). The tables are the
chunk's histograms, shipped (``tables`` section), or calibrated per model
(``cachegen_tables.LevelTables``: the stream carries none). Wide buckets keep
``SPLIT_BITS`` low bits of each symbol raw; alphabets up to ``PAIR_MAX`` are coded two
symbols at a time. Every table of a stream is built in one kernel call
(``rangecoding.build``), the same frequencies as ``rangecoding.frequencies`` of the
``normalize``d / ``pair_table``d counts (the reference). Calibrated tables depend only on
the tables object, the level, the role and the bucket: they are built once per
``LevelTables`` (``prepared``).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import numpy as np

from kvtransfer.codecs import bitpack, lowbits_kernels, rangecoding
from kvtransfer.codecs import cachegen_quant as cq
from kvtransfer.codecs import symbol_kernels as sk
from kvtransfer.codecs.cachegen_tables import ROLES, LevelTables

# Alphabets up to this size are coded two symbols at a time (alphabet <= 4096).
PAIR_MAX = 64
# Low bits of each symbol kept raw, per table bucket: wide buckets (mean |q| >= 2.8 steps)
# code symbol >> r with the table and the r low bits raw. The low bits of a spread-out
# distribution are nearly uniform (the streams grow 0.1-0.6%), and the coded alphabets
# shrink to <= 25 symbols, so they pair: ANS decoding costs per call and per bit of
# alphabet, and this about halves it at levels 0-1.
SPLIT_BITS = np.array([max(0, (b - 8) // 2) if b >= 11 else 0 for b in range(cq.NUM_BUCKETS)], np.int64)
# Coded alphabet per bucket: (2 R_b + 2) >> SPLIT_BITS, rounded up.
CODED_K = -(-(2 * cq.RADIUS.astype(np.int64) + 2) // (1 << SPLIT_BITS))
_RADIUS = cq.RADIUS.astype(np.int64)
# Bucket b >= 1 holds rows of mean |q| >= 2**((b - OFFSET) / 2) (``cachegen_quant.buckets_of``).
_THRESHOLDS = 2.0 ** ((np.arange(cq.NUM_BUCKETS) - cq.OFFSET) / 2)
_NO_SUMS = np.zeros(0, np.int64)


def coded_counts(c: np.ndarray, r: int) -> np.ndarray:
    """Counts of symbol >> r from counts of the symbols."""
    if not r:
        return c
    k = -(-len(c) // (1 << r))
    out: np.ndarray = np.pad(c.astype(np.int64), (0, k * (1 << r) - len(c))).reshape(k, 1 << r).sum(axis=1)
    return out


@functools.cache
def _divisions() -> tuple[np.ndarray, np.ndarray]:
    return sk.pair_divisions(PAIR_MAX)


def prepared(level: LevelTables, role: int, bucket: int) -> rangecoding.Prepared:
    """The coder's table of a calibrated (role, bucket), built on first use and kept on
    the LevelTables (at most roles x buckets per level; treat the tables as immutable)."""
    cache = level.__dict__.setdefault("_prepared", {})
    got = cache.get((role, bucket))
    if got is None:
        c = coded_counts(level.table(role, bucket), int(SPLIT_BITS[bucket]))
        src = np.asarray(c, np.int64)
        got = cache[(role, bucket)] = rangecoding.build(src, np.array([0, len(src)]),
                                                        np.array([len(src) <= PAIR_MAX]), False)[1]
    return got


def _calibrated(level: LevelTables, roles: np.ndarray, used: np.ndarray) -> rangecoding.Prepared:
    parts = [prepared(level, int(r), int(b)) for r, b in zip(roles, used)]
    sizes = np.array([len(p[0]) for p in parts], np.int64)
    off = np.zeros(len(parts) + 1, np.int64)
    np.cumsum(sizes, out=off[1:])
    if not parts:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.int64), off
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]), off)


def encode(rows: list[np.ndarray], sums: list[np.ndarray | None], level: LevelTables | None) -> list[Any]:
    """Rows of symbols of each role (int32 [R, n]; sums: each row's sum of |q| where the
    quantiser counted it) -> the sections buckets, tables, escapes, low, words. One kernel
    call per role (``symbol_kernels.symbolize_role``: buckets, sort, symbols, low bits)."""
    buckets, coded, lens, hists, roles, useds, escapes, low = [], [], [], [], [], [], [], []
    for role, (rw, s) in enumerate(zip(rows, sums)):
        bk, used, c, ln, packed, hist, esc = sk.symbolize_role(
            np.ascontiguousarray(rw, np.int32), _NO_SUMS if s is None else np.ascontiguousarray(s, np.int64),
            s is not None, _THRESHOLDS, _RADIUS, SPLIT_BITS, CODED_K, PAIR_MAX)
        buckets.append(bk)
        coded.append(c)
        lens.append(ln)
        hists.append(hist)
        roles.append(np.full(len(used), role))
        useds.append(used)
        escapes.append(esc)
        low.append(packed)
    used_all, role_all = np.concatenate(useds), np.concatenate(roles)
    ks = CODED_K[used_all]
    if level is None:  # shipped: the histograms of this chunk's coded symbols
        shipped, tables = rangecoding.build(np.concatenate(hists), sk.offsets(ks), ks <= PAIR_MAX, True)
        blob = zlib.compress(shipped.tobytes(), 6)
    else:
        tables, blob = _calibrated(level, role_all, used_all), b""
    lens_all = np.concatenate(lens)
    words = rangecoding.encode_prepared(np.concatenate(coded), lens_all, np.arange(len(lens_all)), tables)
    esc = np.concatenate([np.array([len(e) for e in escapes], np.int32), *escapes])
    return [bitpack.pack(np.concatenate(buckets), 5), blob, esc, b"".join(x.tobytes() for x in low), words]


def decode(sec: dict[str, memoryview], nrows: list[int], sizes: list[int],
           level: LevelTables | None) -> list[np.ndarray]:
    """Inverse of encode: the rows of each role (int32 [nrows[role], sizes[role]]) from
    the sections; ValueError naming what does not match."""
    flat = bitpack.unpack(np.frombuffer(sec["buckets"], np.uint8), 5, sum(nrows))
    if int(flat.max(initial=0)) >= cq.NUM_BUCKETS:
        raise ValueError("table bucket out of range")
    buckets = np.split(flat, np.cumsum(nrows)[:-1])
    counts = [np.bincount(bk, minlength=cq.NUM_BUCKETS) for bk in buckets]
    useds = [np.flatnonzero(c) for c in counts]
    used = np.concatenate(useds)
    role_of = np.concatenate([np.full(len(u), r) for r, u in enumerate(useds)])
    ks = CODED_K[used]
    paired = ks <= PAIR_MAX
    split = SPLIT_BITS[used]
    n = np.concatenate([c[u] * s for c, u, s in zip(counts, useds, sizes)]).astype(np.int64)
    lens = np.where(paired, (n + 1) // 2, n)
    kp = np.where(paired, ks, 0)
    if level is not None:
        tables = _calibrated(level, role_of, used)
    else:
        blob = np.frombuffer(zlib.decompress(sec["tables"]), np.uint16)
        soff = sk.offsets(ks)
        if soff[-1] != len(blob):
            raise ValueError(f"tables section holds {len(blob)} counts, the buckets need {int(soff[-1])}")
        tables = rangecoding.build(blob, soff, paired, False)[1]
    syms = rangecoding.decode_prepared(np.frombuffer(sec["words"], np.uint32), lens, np.arange(len(lens)), tables)
    cstart = sk.offsets(lens)
    low, lstart = lowbits_kernels.unpack(np.frombuffer(sec["low"], np.uint8), n, split)
    escapes = np.frombuffer(sec["escapes"], np.int32)
    n_esc = escapes[:len(ROLES)].view(np.uint32).astype(np.int64)
    if len(n_esc) != len(ROLES) or len(ROLES) + int(n_esc.sum()) != len(escapes):
        raise ValueError("escape counts do not match the escaped values")
    bounds = len(ROLES) + np.concatenate([[0], np.cumsum(n_esc)])
    rows, si = [], 0
    for role, bk in enumerate(buckets):
        nu = len(useds[role])
        out, e = sk.desymbolize_role(syms, cstart[si:si + nu + 1], low, lstart[si:si + nu + 1], bk, useds[role],
                                     _RADIUS, SPLIT_BITS, kp[si:si + nu], escapes[bounds[role]:bounds[role + 1]],
                                     *_divisions(), sizes[role])
        if e != bounds[role + 1] - bounds[role]:
            raise ValueError(f"{max(e, 0) if e >= 0 else 'more'} escape symbols but "
                             f"{bounds[role + 1] - bounds[role]} escaped values")
        rows.append(out)
        si += nu
    return rows
