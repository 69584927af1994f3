import numpy as np
import pytest
import torch

from engine import kvcopy
from engine.runner import ModelRunner


@pytest.fixture(params=["fused", "plain"])
def kernels(request, monkeypatch):
    """Both ways of copying KV: engine.kvcopy's numba loops, and numpy/torch without them."""
    if request.param == "fused":
        if not kvcopy.available():
            pytest.skip("numba is not installed here")
    else:
        monkeypatch.setattr(kvcopy, "_kernels", False)
    return request.param


def test_export_import_round_trip_any_length(kernels):
    caches = [torch.randn(2, 16, 4, 2, 8) for _ in range(3)]
    r = ModelRunner(torch.nn.Identity(), caches, 4)
    table = [7, 2, 11, 0]
    for n in (1, 4, 9, 16):
        kv = r.export_kv(table, n)
        # slot-by-slot reference
        for t in range(n):
            b, o = table[t // 4], t % 4
            assert torch.equal(kv[:, 0, t], torch.stack([c[0, b, o] for c in caches]))
            assert torch.equal(kv[:, 1, t], torch.stack([c[1, b, o] for c in caches]))
        dst = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 16, 4, 2, 8) for _ in range(3)], 4)
        dst.import_kv([3, 5, 1, 9], kv)
        assert torch.equal(dst.export_kv([3, 5, 1, 9], n), kv)


def test_import_takes_this_ranks_heads(kernels):
    full = torch.randn(2, 2, 6, 4, 8)  # 4 kv heads in all
    r1 = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 4, 4, 2, 8) for _ in range(2)], 4, tp_rank=1, tp_size=2)
    r1.import_kv([0, 1], full)
    assert torch.equal(r1.export_kv([0, 1], 6), full[:, :, :, 2:4])


@pytest.mark.parametrize("as_array", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_any_offset_and_sums(kernels, dtype, as_array):
    """Pieces starting mid-block land where the slot-by-slot reference puts them, whichever
    copy ran; with the kernels, write_kv(checksum=True) returns the words' sum."""
    from kvtransfer.shm import checksum

    src = torch.randn(2, 23, 3, 8).to(dtype)  # [K/V, tokens, kv heads, head dim]
    table = [5, 0, 9, 3, 7, 1]
    given = np.asarray(table, dtype=np.int64) if as_array else table  # admission passes numpy
    r = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 10, 4, 3, 8, dtype=dtype)], 4)
    ref = torch.zeros(2, 10, 4, 3, 8, dtype=dtype)
    for first, end in ((0, 3), (3, 4), (4, 13), (13, 23)):  # uneven pieces, both parts
        for j in (0, 1):
            got = r.write_kv(given, 0, first, src[j, first:end], j, checksum=True)
            want = checksum(src[j, first:end].contiguous())
            assert got == (want if kernels == "fused" else None)
    for t in range(23):
        ref[:, table[t // 4], t % 4] = src[:, t]
    assert torch.equal(r.kv_caches[0].view(torch.uint8), ref.view(torch.uint8))


def test_export_sums_are_the_rows_checksums(kernels):
    from kvtransfer.shm import checksum

    caches = [torch.randn(2, 16, 4, 2, 8) for _ in range(3)]
    r = ModelRunner(torch.nn.Identity(), caches, 4)
    sums: list[int] = []
    kv = r.export_kv([7, 2, 11, 0], 14, sums=sums)
    if kernels == "fused":
        assert sums == [checksum(kv[layer, j]) for layer in range(3) for j in (0, 1)]
    else:
        assert sums == []  # no kernels: the arena sums the slot itself


def test_kernels_match_numpy():
    if not kvcopy.available():
        pytest.skip("numba is not installed here")
    rng = np.random.default_rng(0)
    src = rng.integers(0, 2**63, size=(37, 5), dtype=np.uint64)
    cache = np.zeros((96, 5), dtype=np.uint64)
    table = np.array([3, 11, 0, 7, 5], dtype=np.int64)
    s = kvcopy.scatter_sum(cache, src, table, 2, 8)
    rows = [table[(2 + t) // 8] * 8 + (2 + t) % 8 for t in range(37)]
    assert np.array_equal(cache[rows], src)
    want = int(src.sum(dtype=np.uint64))  # numpy's uint64 sum wraps around
    assert s == want
    out = np.zeros((37, 5), dtype=np.uint64)
    g = kvcopy.gather_sum(out, cache, table, 8)
    picked = cache[[table[t // 8] * 8 + t % 8 for t in range(37)]]
    assert np.array_equal(out, picked) and g == int(picked.sum(dtype=np.uint64))
    flat = np.empty(src.size, dtype=np.uint64)
    assert kvcopy.copy_sum(flat, src.reshape(-1)) == want and np.array_equal(flat, src.reshape(-1))
    assert kvcopy.word_sum(flat) == want
    rows = np.zeros_like(src)
    per_row = [int(r.sum(dtype=np.uint64)) for r in src]
    assert kvcopy.copy_rows_sum(rows, src) == per_row and np.array_equal(rows, src)
    assert kvcopy.rows_sum(rows) == per_row
