"""Paged attention on the CPU (and any device torch runs on): write the step's K/V into
the block cache, gather each sequence's context through its block table, attend.

Decode-only sequences are batched in one padded SDPA call; prefill chunks loop per
sequence with a causal mask offset by the context already cached."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention_metadata import AttentionMetadata


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """cache: [2, blocks, block_size, kvh, hd]; k, v: [T, kvh, hd]."""
    flat = cache.view(2, -1, cache.shape[3], cache.shape[4])
    flat[0, slots] = k
    flat[1, slots] = v


def _gather(cache: torch.Tensor, table: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    bs = cache.shape[2]
    blocks = torch.tensor(table[: -(-n // bs)], dtype=torch.long)
    kv = cache[:, blocks].reshape(2, -1, cache.shape[3], cache.shape[4])[:, :n]
    return kv[0], kv[1]


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, hd] (K/V of these tokens already written). Returns [T, heads, hd]."""
    heads, hd = q.shape[1], q.shape[2]
    groups = heads // cache.shape[3]
    out = torch.empty_like(q)
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    decode_idx = [i for i, n in enumerate(meta.query_lens) if n == 1]
    if len(decode_idx) > 1:
        ctx = [meta.context_lens[i] for i in decode_idx]
        longest = max(ctx)
        keys = q.new_zeros(len(decode_idx), longest, cache.shape[3], hd)
        vals = torch.zeros_like(keys)
        for j, i in enumerate(decode_idx):
            k, v = _gather(cache, meta.block_tables[i], ctx[j])
            keys[j, : ctx[j]] = k
            vals[j, : ctx[j]] = v
        mask = torch.arange(longest)[None, :] < torch.tensor(ctx)[:, None]  # [B, L]
        qb = q[[starts[i] for i in decode_idx]].unsqueeze(2)  # [B, heads, 1, hd]
        kb = keys.repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, heads, L, hd]
        vb = vals.repeat_interleave(groups, dim=2).transpose(1, 2)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None, None, :], scale=scale)
        out[[starts[i] for i in decode_idx]] = ob.squeeze(2)
        done = set(decode_idx)
    else:
        done = set()
    for i, n in enumerate(meta.query_lens):
        if i in done:
            continue
        c = meta.context_lens[i]
        k, v = _gather(cache, meta.block_tables[i], c)
        qi = q[starts[i] : starts[i] + n].transpose(0, 1)  # [heads, n, hd]
        ki = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # [heads, c, hd]
        vi = v.repeat_interleave(groups, dim=1).transpose(0, 1)
        if n == 1:
            oi = F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
        else:
            # query j sits at position c - n + j and sees keys 0 .. c - n + j
            mask = torch.arange(c)[None, :] <= (torch.arange(n)[:, None] + (c - n))
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[starts[i] : starts[i] + n] = oi.transpose(0, 1)
    return out
