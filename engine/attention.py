"""Paged attention in plain PyTorch (CPU or any device torch runs on).

Per layer: ``write_kv`` stores the step's K/V at their slots, then ``paged_attention``
gathers each sequence's keys and values for positions [0, context_len) through its block
table and attends. Decode sequences (query_len 1) of a step go through the paged kernel
(engine.paged_kernel: fp32 on CPU, reading the blocks in place) or else one padded SDPA
call with a key-padding mask; prefill chunks loop, each with a causal mask offset by the
context already cached (query i of a chunk of q tokens over a context of c sits at
position c - q + i and sees keys 0 .. c - q + i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention_metadata import AttentionMetadata


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """cache: [2, blocks, block_size, kvh, hd]; k, v: [T, kvh, hd]; slots: LongTensor [T]."""
    flat = cache.view(2, -1, cache.shape[3], cache.shape[4])
    # Keys and values in one copy (2 dispatches, not 6: a decode step runs this per layer).
    flat.index_copy_(1, slots.to(cache.device), torch.stack((k, v)).to(cache.dtype))


def gather_kv(cache: torch.Tensor, table: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [n, kvh, hd] of the first n positions of one sequence."""
    bs = cache.shape[2]
    blocks = torch.tensor(table[: -(-n // bs)], dtype=torch.long, device=cache.device)
    kv = cache.index_select(1, blocks).flatten(1, 2)[:, :n]
    return kv[0], kv[1]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool mask [.., Q, K]: key position visible from query position (causal, window)."""
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


def _expand(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """GQA: KV head j serves query heads j*groups .. (j+1)*groups - 1."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def _decode_plan(cache: torch.Tensor, tables: list[list[int]], ctx: list[int],
                 window: int | None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The decode batch's gather indices (flattened padded block table), blocks per
    sequence, and key mask [B, 1, 1, L]: the same for every layer of a step."""
    dev, bs = cache.device, cache.shape[2]
    nblk = max(-(-c // bs) for c in ctx)
    flat: list[int] = []
    for t, c in zip(tables, ctx):
        used = -(-c // bs)
        flat.extend(t[:used])
        flat.extend([0] * (nblk - used))  # padding reads block 0, masked out
    lens = torch.tensor(ctx, device=dev)
    k_pos = torch.arange(nblk * bs, device=dev)[None, :]
    mask = (k_pos < lens[:, None]) & _visible((lens - 1)[:, None], k_pos, window)  # [B, L]
    # The additive form SDPA makes of a bool mask in every call (0 where visible, -inf
    # elsewhere: torch's convert_boolean_attn_mask), made once per step here.
    add = torch.zeros(mask.shape, dtype=cache.dtype, device=dev).masked_fill_(~mask, float("-inf"))
    return torch.tensor(flat, dtype=torch.long, device=dev), nblk, add[:, None, None, :]


def _decode_batch(q: torch.Tensor, cache: torch.Tensor, tables: list[list[int]], ctx: list[int],
                  scale: float, window: int | None) -> torch.Tensor:
    """q: [B, heads, hd], one query per sequence at position ctx[b] - 1 -> [B, heads, hd]."""
    return _decode_planned(q, cache, _decode_plan(cache, tables, ctx, window), scale)


def _decode_planned(q: torch.Tensor, cache: torch.Tensor, plan: tuple[torch.Tensor, int, torch.Tensor],
                    scale: float) -> torch.Tensor:
    """_decode_batch with the step's plan (_decode_plan) already built."""
    table, nblk, mask = plan
    b = q.shape[0]
    # [2, B, L, kvh, hd]; padding reads block 0. index_select over the flattened table, not
    # advanced indexing (cache[:, table]): the same bytes, 5x faster on CPU (aten::index
    # took 27% of a SmolLM2 decode step at batch 8; benchmarks/attention_bench.py).
    kv = cache.index_select(1, table).view(cache.shape[0], b, nblk * cache.shape[2], cache.shape[3],
                                           cache.shape[4])
    # [B, kvh, L, hd]; SDPA maps query head h to KV head h // groups itself (enable_gqa),
    # which skips the copy repeat_interleave makes of the whole gathered context: 1.5x
    # faster per layer at 16 x 1536 on the demo heads, bit-identical outputs.
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    if mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != cache.shape[3])
    return out.squeeze(2)


def _prefill_one(q: torch.Tensor, cache: torch.Tensor, table: list[int], c: int, scale: float,
                 window: int | None) -> torch.Tensor:
    """q: [n, heads, hd], the last n of c positions -> [n, heads, hd]."""
    n, dev = q.shape[0], q.device
    k, v = gather_kv(cache, table, c)
    groups = q.shape[1] // cache.shape[3]
    k = _expand(k.transpose(0, 1), groups, 0)  # [heads, c, hd]
    v = _expand(v.transpose(0, 1), groups, 0)
    q_pos = torch.arange(c - n, c, device=dev)[:, None]
    mask = _visible(q_pos, torch.arange(c, device=dev)[None, :], window)  # [n, c]
    # 4-D operands (a batch of one): on CPU, torch routes 3-D SDPA to its unfused math path
    # (bmm, softmax, masked-row fixups: 16 ms for a 512-token chunk over 1024 positions
    # and 4 heads) and 4-D to the fused flash kernel (3 ms). The two differ by rounding
    # (<= 4e-7 in fp32 on our shapes); greedy outputs still equal transformers' generate.
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def _step_plan(meta: AttentionMetadata, cache: torch.Tensor, window: int | None) -> dict[str, object]:
    """Index tensors and masks of a step, built once (first layer) and kept in meta.plan."""
    key = (str(cache.device), cache.shape[2], window)
    plan = meta.plan.get(key)
    if plan is not None:
        return plan  # type: ignore[no-any-return]
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
    # "decode": the decode sequences' gather plan (_decode_plan) or, for the paged kernel,
    # "kernel": their block tables; each built by _decode_rows at its first layer, as is
    # "use_kernel" (which of the two).
    plan = {"starts": starts, "seqs": decode, "rows": None,
            "all_decode": len(decode) == len(meta.query_lens)}
    if decode and not plan["all_decode"]:
        plan["rows"] = torch.tensor([starts[i] for i in decode], device=cache.device)
    meta.plan[key] = plan
    return plan


def _decode_rows(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, plan: dict[str, object],
                 scale: float, window: int | None) -> torch.Tensor:
    """Attention of the step's decode sequences (plan["seqs"], their queries q [B, heads,
    hd]): the paged kernel reading the cache in place (engine.paged_kernel: fp32 on CPU),
    else gather + SDPA."""
    from engine.paged_kernel import decode_tables, paged_decode, wanted

    seqs: list[int] = plan["seqs"]  # type: ignore[assignment]
    if "use_kernel" not in plan:  # decided once a step, not per layer
        plan["use_kernel"] = wanted(cache.dtype, cache.device)
    if plan["use_kernel"]:
        if "kernel" not in plan:
            plan["kernel"] = decode_tables([meta.block_tables[i] for i in seqs],
                                           [meta.context_lens[i] for i in seqs], cache.shape[2])
        table, lens = plan["kernel"]  # type: ignore[misc]
        return paged_decode(q, cache, table, lens, scale, window)
    if "decode" not in plan:
        plan["decode"] = _decode_plan(cache, [meta.block_tables[i] for i in seqs],
                                      [meta.context_lens[i] for i in seqs], window)
    return _decode_planned(q, cache, plan["decode"], scale)  # type: ignore[arg-type]


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """q: [T, heads, hd] for the step's tokens, whose K/V are already in ``cache``.
    Returns the attention output [T, heads, hd]."""
    plan = _step_plan(meta, cache, sliding_window)
    if plan["all_decode"]:  # a pure decode step: one batched call, no scatter
        return _decode_rows(q, cache, meta, plan, scale, sliding_window).to(q.dtype)
    out = torch.empty_like(q)
    starts: list[int] = plan["starts"]  # type: ignore[assignment]
    if plan["seqs"]:
        rows: torch.Tensor = plan["rows"]  # type: ignore[assignment]
        ob = _decode_rows(q.index_select(0, rows), cache, meta, plan, scale, sliding_window)
        out.index_copy_(0, rows, ob.to(out.dtype))
    for i, n in enumerate(meta.query_lens):
        if n <= 1:
            continue
        s = starts[i]
        out[s:s + n] = _prefill_one(q[s:s + n], cache, meta.block_tables[i], meta.context_lens[i], scale,
                                    sliding_window)
    return out
