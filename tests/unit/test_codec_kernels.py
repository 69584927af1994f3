"""The codecs' fast paths equal their readable references: the numba quantiser and its
token-major inverse (cachegen_quant), RoPE in place (kvtc), and the rANS coder
(rangecoding: round trip, size near the entropy, altered or truncated words raise)."""

import numpy as np
import pytest
import torch

from kvtransfer.codecs import cachegen_quant as cq
from kvtransfer.codecs import kernels, rangecoding


@pytest.mark.parametrize("tokens,group", [(100, 10), (97, 10), (5, 10), (1, 10), (33, 1), (0, 10)])
def test_quantize_equals_the_reference(tokens, group):
    g = torch.Generator().manual_seed(tokens)
    z = torch.randn(3, 2, 8, tokens, generator=g) * torch.rand(3, 2, 8, 1, generator=g) * 4
    z[0, 1, 2] += torch.linspace(0, 3, tokens)  # a drifting channel: delta mode
    delta = (0.05 + torch.rand(3, 2, generator=g)).numpy().astype(np.float32)
    fast, ref = cq.quantize(z.transpose(2, 3), delta, group), cq.quantize_reference(z, delta, group)
    for k in ("ref", "mode", "qa", "qd"):
        assert np.array_equal(getattr(fast, k), getattr(ref, k)), k
    rows = fast.qd.reshape(3 * 2 * 8, -1)
    assert np.array_equal(cq.buckets_of(rows, fast.sum_d), cq.buckets_of(rows))
    back = cq.reconstruct_tokens(fast.delta, fast.ref, fast.mode, fast.qa, fast.qd, tokens, group)
    want = cq.reconstruct_tokens_reference(ref.delta, ref.ref, ref.mode, ref.qa, ref.qd, tokens, group)
    assert torch.equal(back, want)
    assert bool((back.permute(0, 1, 3, 2) - z).abs().le(torch.from_numpy(delta)[:, :, None, None] / 2 + 1e-5).all())


def test_quantize_refuses_non_finite():
    z = torch.zeros(1, 2, 20, 4)
    z[0, 1, 7, 3] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        cq.quantize(z, np.ones((1, 2), np.float32), 10)


def test_rope_in_place_equals_rope_keys():
    from kvtransfer.codecs.kvtc_calib import rope_keys

    inv = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    x = torch.randn(2, 2, 30, 3, 16)
    for sign in (1, -1):
        want = rope_keys(x[:, 0], 17, inv, sign)
        got = x.clone()
        kernels.rope_(got[:, 0].numpy(), 17, inv, sign)
        assert torch.allclose(got[:, 0], want, atol=1e-5)
        assert torch.equal(got[:, 1], x[:, 1])  # values untouched


def test_rans_round_trip_near_entropy_and_damage_raises():
    rng = np.random.default_rng(0)
    p = np.array([0.9, 0.05, 0.03, 0.02])
    a = rng.choice(4, size=20000, p=p).astype(np.int32)
    b = rng.integers(0, 300, size=5001).astype(np.int32)
    c = np.zeros(0, np.int32)
    tables = [np.bincount(a, minlength=4), np.ones(300)]
    words = rangecoding.encode([a, c, b], [0, 1, 1], tables)
    out = rangecoding.decode(words, [len(a), 0, len(b)], [0, 1, 1], tables)
    assert np.array_equal(out[0], a) and len(out[1]) == 0 and np.array_equal(out[2], b)
    bits = 32 * len(words)
    entropy = len(a) * -(p * np.log2(p)).sum() + len(b) * np.log2(300)
    assert bits < 1.02 * entropy + 128
    bad = words.copy()
    bad[len(bad) // 2] ^= 1 << 7
    with pytest.raises(ValueError):
        rangecoding.decode(bad, [len(a), 0, len(b)], [0, 1, 1], tables)
    with pytest.raises(ValueError):
        rangecoding.decode(words[:-1], [len(a), 0, len(b)], [0, 1, 1], tables)
    with pytest.raises(ValueError, match="alphabet"):
        rangecoding.encode([np.array([4], np.int32)], [0], [np.ones(4)])


def test_symbolize_equals_to_streams_split_and_pair():
    from kvtransfer.codecs import symbol_kernels
    from kvtransfer.codecs.cachegen_symbols import PAIR_MAX, SPLIT_BITS

    rng = np.random.default_rng(3)
    scale = np.exp(rng.uniform(-4, 4, size=(200, 1)))
    rows = np.round(rng.laplace(size=(200, 37)) * scale).astype(np.int32)
    rows[5, 3] = 5000  # an escape
    bk = cq.buckets_of(rows)
    order = np.argsort(bk, kind="stable")
    counts = np.bincount(bk, minlength=cq.NUM_BUCKETS)
    used = np.flatnonzero(counts)
    split = SPLIT_BITS[used]
    ks = -(-(2 * cq.RADIUS[used].astype(np.int64) + 2) // (1 << split))
    paired = ks <= PAIR_MAX
    c, cstart, lo, lstart, hist, hstart, esc = symbol_kernels.symbolize(rows, order, counts[used], cq.RADIUS[used],
                                                                        split, ks, paired)
    coded = [c[cstart[i]:cstart[i + 1]] for i in range(len(used))]
    lows = [lo[lstart[i]:lstart[i + 1]] for i in range(len(used))]
    hists = [hist[hstart[i]:hstart[i + 1]] for i in range(len(used))]
    ref = cq.to_streams(rows, bk)
    assert ref.buckets == [int(b) for b in used] and np.array_equal(esc, ref.escapes) and len(esc) >= 1
    for i, sym in enumerate(ref.symbols):
        r = int(split[i])
        assert np.array_equal(lows[i], (sym & ((1 << r) - 1)).astype(np.uint8) if r else np.zeros(0, np.uint8))
        hi = sym >> r
        assert np.array_equal(hists[i], np.bincount(hi, minlength=int(ks[i])))
        assert np.array_equal(coded[i], rangecoding.pair(hi, int(ks[i])) if paired[i] else hi)
