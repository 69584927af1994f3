"""Allocator tuning (engine/alloc.py) and the decode attention's GQA path."""

import os
import platform
import subprocess
import sys

import pytest
import torch

from engine.attention import _decode_batch, _expand, _visible

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _probe(env_value: str | None) -> str:
    """tune_malloc()'s answer and glibc's mmap threshold behaviour in a fresh process: a
    4 MiB block is served from the heap (not a fresh mmap) only when the threshold is raised."""
    code = (
        "import ctypes, ctypes.util\n"
        "from engine.alloc import tune_malloc, malloc_tuned\n"
        "ok = tune_malloc()\n"
        "assert tune_malloc() == ok and malloc_tuned() == ok\n"
        "class MI(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena','ordblks','smblks','hblks','hblkhd','usmblks',"
        "'fsmblks','uordblks','fordblks','keepcost')]\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.mallinfo2.restype = MI\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "before = libc.mallinfo2().hblks\n"
        "p = libc.malloc(4 << 20)\n"
        "mapped = libc.mallinfo2().hblks - before\n"
        "libc.free(ctypes.c_void_p(p))\n"
        "print(ok, mapped)\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("SPLITSERVE_MALLOC_TUNE", None)
    if env_value is not None:
        env["SPLITSERVE_MALLOC_TUNE"] = env_value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_tune_malloc_keeps_large_blocks_in_heap_and_env_turns_it_off():
    ok, mapped = _probe(None).split()
    assert ok == "True" and int(mapped) == 0  # 4 MiB from the heap
    ok, mapped = _probe("0").split()
    assert ok == "False" and int(mapped) >= 1  # default: a fresh mmap


def _decode_by_copy(q, cache, tables, ctx, scale, window):
    """Reference: K/V repeated to every query head, one SDPA per sequence, no padding."""
    bs = cache.shape[2]
    outs = []
    for b, (t, c) in enumerate(zip(tables, ctx)):
        blocks = torch.tensor(t[: -(-c // bs)])
        kv = cache.index_select(1, blocks).flatten(1, 2)[:, :c]
        groups = q.shape[1] // cache.shape[3]
        k = _expand(kv[0].transpose(0, 1), groups, 0)
        v = _expand(kv[1].transpose(0, 1), groups, 0)
        pos = torch.arange(c)
        mask = _visible(torch.tensor([[c - 1]]), pos[None, :], window)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v, attn_mask=mask,
                                                                     scale=scale)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 2, None), (8, 2, None), (4, 4, None), (4, 1, 5)])
def test_decode_batch_gqa_matches_per_head_copy(heads, kv_heads, window):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    bs, hd, nblocks = 4, 8, 40
    cache = torch.randn(2, nblocks, bs, kv_heads, hd, generator=g)
    ctx = [1, 7, 13, 30]
    perm = torch.randperm(nblocks - 1, generator=g) + 1
    tables = [perm[i * 8:(i + 1) * 8].tolist() for i in range(len(ctx))]
    q = torch.randn(len(ctx), heads, hd, generator=g)
    got = _decode_batch(q, cache, tables, ctx, hd ** -0.5, window)
    want = _decode_by_copy(q, cache, tables, ctx, hd ** -0.5, window)
    assert got.shape == (len(ctx), heads, hd)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
