"""Attention on CPU, side by side in one run:

- prefill: the engine's path (``engine.attention._prefill_one``, SDPA on 4-D operands,
  torch's fused kernel) against the same call on 3-D operands (the unfused math path the
  engine used before session 3), per chunk shape (chunk tokens, positions attended);
- decode (``--decode``): the engine's batched decode attention
  (``engine.attention._decode_batch``: the block gather by ``index_select``) against the
  same call gathering by advanced indexing (``cache[:, table]``, the engine before session
  7), per (batch, context), with shuffled block tables;

for the demo model's heads (SmolLM2-135M: 9 query heads over 3 KV heads of 64) and a
Llama-3-8B-like layer's (32 query heads over 8 KV heads of 128).

    PYTHONPATH=. python -m benchmarks.attention_bench [--json] [--repeat 5] [--decode]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from engine.attention import _prefill_one

SHAPES = ((512, 512), (512, 1024), (256, 1280), (512, 1536), (128, 2048))
DECODE_SHAPES = ((1, 256), (8, 256), (8, 1024), (16, 1024), (32, 512))
HEADS = {"smollm2 (9 q / 3 kv heads x 64)": (9, 3, 64), "llama-3-8b-like (32 / 8 x 128)": (32, 8, 128)}


def _decode_adv_index(q: torch.Tensor, cache: torch.Tensor, tables: list[list[int]], ctx: list[int],
                      scale: float) -> torch.Tensor:
    """The decode attention before session 7: the same call, the gather by cache[:, table]."""
    from engine.attention import _visible

    bs = cache.shape[2]
    nblk = max(-(-c // bs) for c in ctx)
    table = torch.zeros(len(ctx), nblk, dtype=torch.long)
    for b, (t, c) in enumerate(zip(tables, ctx)):
        table[b, :-(-c // bs)] = torch.tensor(t[:-(-c // bs)])
    kv = cache[:, table].flatten(2, 3)
    lens = torch.tensor(ctx)
    k_pos = torch.arange(kv.shape[2])[None, :]
    mask = (k_pos < lens[:, None]) & _visible((lens - 1)[:, None], k_pos, None)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0].transpose(1, 2), kv[1].transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=q.shape[1] != cache.shape[3])
    return out.squeeze(2)


def run_decode(repeat: int) -> list[dict[str, object]]:
    from engine.alloc import tune_malloc
    from engine.attention import _decode_batch

    tune_malloc()  # as every engine process does (engine/alloc.py)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, (hq, hkv, hd) in HEADS.items():
        for batch, c in DECODE_SHAPES:
            block = 16
            per = -(-c // block)
            cache = torch.randn(2, batch * per + 4, block, hkv, hd, generator=g)
            order = torch.randperm(batch * per, generator=g).tolist()
            tables = [order[b * per:(b + 1) * per] for b in range(batch)]
            ctx = [c - 3 * b for b in range(batch)]  # ragged lengths, as a running batch has
            q = torch.randn(batch, hq, hd, generator=g)
            scale = hd ** -0.5
            new = _time(lambda: _decode_batch(q, cache, tables, ctx, scale, None), repeat)
            old = _time(lambda: _decode_adv_index(q, cache, tables, ctx, scale), repeat)
            diff = (_decode_batch(q, cache, tables, ctx, scale, None) - _decode_adv_index(q, cache, tables, ctx,
                                                                                          scale)).abs().max()
            rows.append({"heads": label, "batch": batch, "positions": c, "index_select_ms": round(new * 1e3, 3),
                         "adv_index_ms": round(old * 1e3, 3), "speedup": round(old / new, 2),
                         "max_abs_diff": float(diff)})
    return rows


def _math_path(q: torch.Tensor, cache: torch.Tensor, table: list[int], c: int, scale: float) -> torch.Tensor:
    """The pre-session-3 call: the same gather and mask, SDPA on 3-D operands."""
    from engine.attention import _expand, _visible, gather_kv

    n = q.shape[0]
    k, v = gather_kv(cache, table, c)
    groups = q.shape[1] // cache.shape[3]
    k = _expand(k.transpose(0, 1), groups, 0)
    v = _expand(v.transpose(0, 1), groups, 0)
    mask = _visible(torch.arange(c - n, c)[:, None], torch.arange(c)[None, :], None)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def _time(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(repeat: int) -> list[dict[str, object]]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, (hq, hkv, hd) in HEADS.items():
        for n, c in SHAPES:
            block = 16
            blocks = -(-c // block)
            cache = torch.randn(2, blocks, block, hkv, hd, generator=g)
            table = list(range(blocks))
            q = torch.randn(n, hq, hd, generator=g)
            scale = hd ** -0.5
            new = _time(lambda: _prefill_one(q, cache, table, c, scale, None), repeat)
            old = _time(lambda: _math_path(q, cache, table, c, scale), repeat)
            diff = (_prefill_one(q, cache, table, c, scale, None) - _math_path(q, cache, table, c, scale)).abs().max()
            rows.append({"heads": label, "chunk": n, "positions": c, "fused_ms": round(new * 1e3, 3),
                         "math_ms": round(old * 1e3, 3), "speedup": round(old / new, 2),
                         "max_abs_diff": float(diff)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--decode", action="store_true", help="the decode attention instead of prefill")
    args = ap.parse_args(argv)
    if args.decode:
        rows = run_decode(args.repeat)
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        for r in rows:
            print(f"{r['heads']:32s} batch {r['batch']:3d} over {r['positions']:4d}: index_select "
                  f"{r['index_select_ms']:7.3f} ms, advanced index {r['adv_index_ms']:7.3f} ms, x{r['speedup']:.2f} "
                  f"(max diff {r['max_abs_diff']:.1e})")
        return
    rows = run(args.repeat)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(f"{r['heads']:32s} chunk {r['chunk']:4d} over {r['positions']:4d}: fused {r['fused_ms']:8.2f} ms, "
              f"math {r['math_ms']:8.2f} ms, x{r['speedup']:.2f} (max diff {r['max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
