"""The codecs' per-call work done once or in one kernel, and what is cached between calls:

- ``rangecoding.build`` (every table of a stream in one numba call) equals the readable
  ``normalize`` / ``pair_table`` / ``frequencies`` (numpy's pairwise sum included), and
  the low bits pack as ``bitpack`` packs them: streams stay byte for byte what they were;
- caches (cachegen's calibrated tables per level/role/bucket, kvtc's PCA matrices per
  layer slice, RoPE angle tables per position) give the bytes of a cold encode, and a
  call for another level, layer or position never reuses an entry of the wrong key: a
  cold encode is taken first, the caches are then filled by other keys, and the same
  encode must give the same bytes (a cache keyed without the layer, level or position
  would hand it the other key's entry);
- codecs shared by threads (a transfer's sender pool) code as they do alone.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from benchmarks.codec_bench import synthetic_kv
from kvtransfer.codec import get_codec
from kvtransfer.codecs import bitpack, cachegen_symbols, kernels, lowbits_kernels, rangecoding, rans_kernels
from kvtransfer.codecs import symbol_kernels as sk
from kvtransfer.codecs.cachegen import calibrate
from kvtransfer.codecs.cachegen_tables import CacheGenTables
from kvtransfer.codecs.kvtc_calib import calibrate_kv


def test_pairwise_sum_is_numpys():
    rng = np.random.default_rng(0)
    for n in [*range(0, 260), 1000, 4096, 4097, 12345]:
        a = rng.random(n) * rng.choice([1e-9, 1.0, 1e6])
        assert rans_kernels.pairwise_sum(a, 0, n) == a.sum(), n


def test_constants_match_rangecoding():
    assert (rans_kernels.TABLE_TOTAL, rans_kernels.MIN_BITS, rans_kernels.MAX_BITS, rans_kernels.EXTRA_BITS) == (
        rangecoding.TABLE_TOTAL, rangecoding.MIN_BITS, rangecoding.MAX_BITS, rangecoding.EXTRA_BITS)


@pytest.mark.parametrize("ship", [False, True])
def test_build_equals_normalize_pair_table_frequencies(ship):
    rng = np.random.default_rng(1 + ship)
    for _ in range(300):
        ks = rng.integers(1, 90, int(rng.integers(1, 6)))
        paired = ks <= cachegen_symbols.PAIR_MAX
        src = np.concatenate([rng.integers(1, 10 ** int(rng.integers(1, 6)), k) * (rng.random(k) < rng.random())
                              for k in ks]).astype(np.int64)
        if not ship:
            src += 1  # shipped and calibrated counts are >= 1
        soff = np.concatenate([[0], np.cumsum(ks)])
        shipped, (freq, cum, bits, off) = rangecoding.build(src, soff, paired, ship)
        for t in range(len(ks)):
            c = src[soff[t]:soff[t + 1]]
            if ship:
                c = rangecoding.normalize(c)
                assert np.array_equal(shipped[soff[t]:soff[t + 1]], c)
            f, b = rangecoding.frequencies(rangecoding.pair_table(c) if paired[t] else c)
            assert b == bits[t] and np.array_equal(f, freq[off[t]:off[t + 1]])
            assert np.array_equal(np.cumsum(f, dtype=np.uint32) - f, cum[off[t]:off[t + 1]])


def test_prepared_tables_decode_what_the_reference_coder_encodes():
    """Words of the reference coder (``rangecoding.encode``) decode with the prepared tables
    and the small lookup tables, and the other way round."""
    rng = np.random.default_rng(2)
    counts = [rng.integers(1, 500, k) for k in (3, 25, 64, 300)]
    paired = np.array([True, True, True, False])
    tables = [rangecoding.pair_table(c) if p else c for c, p in zip(counts, paired)]
    arrays = [rng.integers(0, len(t), n).astype(np.int32) for t, n in zip(tables, (5000, 1, 20000, 7))]
    words = rangecoding.encode(arrays, range(4), tables)
    _, prep = rangecoding.build(np.concatenate(counts), np.concatenate([[0], np.cumsum([len(c) for c in counts])]),
                                paired, False)
    lens = np.array([len(a) for a in arrays])
    assert np.array_equal(rangecoding.decode_prepared(words, lens, np.arange(4), prep), np.concatenate(arrays))
    assert np.array_equal(rangecoding.encode_prepared(np.concatenate(arrays), lens, np.arange(4), prep), words)


def test_low_bits_pack_like_bitpack():
    rng = np.random.default_rng(3)
    for split in [[1], [2], [3], [4], [5], [6], [7], [0, 6, 0, 2, 7, 1]]:
        for n0 in (0, 1, 7, 8, 31, 32, 33, 100, 257):
            split_a = np.array(split)
            n = np.array([n0 + i for i in range(len(split))])
            lstart = lowbits_kernels.offsets(np.where(split_a > 0, n, 0))
            low = np.concatenate([rng.integers(0, 1 << r, m) if r else np.zeros(0, int)
                                  for r, m in zip(split, n)]).astype(np.uint8)
            got = lowbits_kernels.pack(low, lstart, split_a)
            want = b"".join(bitpack.pack(low[lstart[i]:lstart[i + 1]], r).tobytes() for i, r in enumerate(split) if r)
            assert got.tobytes() == want, (split, n0)
            back, ls = lowbits_kernels.unpack(got, n, split_a)
            assert np.array_equal(back, low) and np.array_equal(ls, lstart)
            if len(got):
                with pytest.raises(ValueError, match="low-bits"):
                    lowbits_kernels.unpack(got[:-1], n, split_a)


def _fresh(tables: CacheGenTables, tmp_path, name: str) -> CacheGenTables:
    """The same tables loaded anew (same fingerprint, empty caches)."""
    tables.save(tmp_path / name)
    return CacheGenTables.load(tmp_path / name)


def test_calibrated_cachegen_tables_cached_per_level_role_bucket(tmp_path):
    kv = synthetic_kv(layers=3, tokens=120, heads=2, dim=16, token_seed=1)
    tables = calibrate([kv], levels=(1, 3), transform="none")
    x = synthetic_kv(layers=3, tokens=90, heads=2, dim=16, token_seed=2)
    cold = {lv: get_codec("cachegen", level=lv, tables=_fresh(tables, tmp_path, f"c{lv}.npz")).encode(x)
            for lv in (1, 3)}
    warm = _fresh(tables, tmp_path, "warm.npz")
    for lv in (3, 1, 3):
        assert get_codec("cachegen", level=lv, tables=warm).encode(x) == cold[lv]
    for lv in (1, 3):  # each cached table is the reference's for its own (level, role, bucket)
        lt = warm.levels[lv]
        assert lt.__dict__["_prepared"]
        for (role, b), (freq, cum, bits, off) in lt.__dict__["_prepared"].items():
            c = cachegen_symbols.coded_counts(lt.table(role, b), int(cachegen_symbols.SPLIT_BITS[b]))
            f, want_bits = rangecoding.frequencies(rangecoding.pair_table(c) if len(c) <= 64 else c)
            assert np.array_equal(freq, f) and bits[0] == want_bits
        dec = get_codec("cachegen", level=lv, tables=warm).decode(cold[lv])
        assert torch.equal(dec, get_codec("cachegen", level=lv, tables=_fresh(tables, tmp_path, "d.npz")).decode(
            cold[lv]))


def _clear_kvtc_caches(cal) -> None:
    kernels._rope_tables.cache_clear()
    cal.__dict__.pop("_matrices", None)


def test_kvtc_caches_give_cold_bytes_and_never_the_wrong_layer_level_or_position():
    inv = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    cal = calibrate_kv(synthetic_kv(layers=3, tokens=128, heads=2, dim=16, token_seed=1), inv_freq=inv)
    kv = synthetic_kv(layers=3, tokens=64, heads=2, dim=16, token_seed=2)

    def coder(level, layer, first_token):
        return get_codec("kvtc", level=level, calibration=cal, first_layer=layer, total_layers=3,
                         first_token=first_token)

    keys = [(2, 1, 0), (2, 1, 64), (5, 1, 0), (2, 2, 0), (2, 0, 0)]
    cold = {}
    for key in keys:
        _clear_kvtc_caches(cal)
        cold[key] = coder(*key).encode(kv[key[1]:key[1] + 1])
    assert len(set(cold.values())) == len(keys)  # every key codes differently: a mixed-up entry shows
    _clear_kvtc_caches(cal)
    for key in keys + keys[::-1]:  # caches filled by the other keys first
        data = coder(*key).encode(kv[key[1]:key[1] + 1])
        assert data == cold[key], key
        want = coder(*key).decode(data)
        _clear_kvtc_caches(cal)
        assert torch.equal(coder(*key).decode(data), want), key
    # the whole slice and a slice of layers cache their own matrices beside the per-layer ones
    whole = coder(2, 0, 0).encode(kv)
    _clear_kvtc_caches(cal)
    assert coder(2, 0, 0).encode(kv) == whole


def test_codecs_shared_by_threads_code_as_alone():
    cal = calibrate_kv(synthetic_kv(layers=3, tokens=128, heads=2, dim=16, token_seed=1),
                       inv_freq=(1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32))
    kv = synthetic_kv(layers=3, tokens=200, heads=2, dim=16, token_seed=3)
    jobs = [(name, lv, layer, a) for name, lv in (("kvtc", 1), ("kvtc", 6), ("cachegen", 0), ("cachegen", 3))
            for layer in range(3) for a in (0, 100)]

    def codec(name, lv, layer, a):
        opts = {"calibration": cal, "first_token": a} if name == "kvtc" else {}
        return get_codec(name, level=lv, first_layer=layer, total_layers=3, **opts)

    def run(job):
        name, lv, layer, a = job
        c = codec(*job)
        data = c.encode(kv[layer:layer + 1, :, a:a + 100])
        return data, c.decode(data)

    alone = [run(j) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, jobs * 3))
    for i, (data, dec) in enumerate(together):
        assert data == alone[i % len(jobs)][0] and torch.equal(dec, alone[i % len(jobs)][1])


def test_row_buckets_equal_buckets_of():
    """Buckets by thresholds (the encoder's kernel) equal floor(2 log2(mean |q|)) + OFFSET,
    exact powers of two among the spreads included."""
    from kvtransfer.codecs import cachegen_quant as cq

    rng = np.random.default_rng(4)
    for n in (0, 1, 2, 7, 52, 459):
        rows = (rng.laplace(size=(3000, n)) * np.exp(rng.uniform(-5, 6, size=(3000, 1)))).round().astype(np.int32)
        if n:
            rows[:40] = 0
            rows[:40, 0] = 2 ** np.arange(40) % (n * 2 ** 12) * n  # sums n * 2**k: spread exactly 2**k
            rows[40:80] = rng.integers(-3, 4, size=(40, n))
        sums = np.abs(rows.astype(np.int64)).sum(axis=1)
        want = cq.buckets_of(rows, sums)
        th = cachegen_symbols._THRESHOLDS
        assert np.array_equal(sk.row_buckets(rows, sums, True, th), want), n
        assert np.array_equal(sk.row_buckets(rows, sums[:0], False, th), cq.buckets_of(rows)), n
