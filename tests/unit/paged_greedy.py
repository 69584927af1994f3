"""A minimal greedy generation loop over engine.model's paged KV cache, for tests: no
scheduler, no block manager. Blocks are handed out from a shuffled free list, so block
tables are non-contiguous. Each step takes, for every unfinished sequence, either its
next prompt chunk or its last sampled token, so prefill chunks and decodes mix in one
batch when prompts differ in length."""

from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata
from engine.model import CausalLM, allocate_kv_cache


def greedy(model: CausalLM, prompts: list[list[int]], max_new: int, chunk: int | None = None,
           block_size: int = 4, num_blocks: int = 96, dtype: torch.dtype | None = None,
           eos: int | None = 2, margins: list[float] | None = None) -> list[list[int]]:
    """Greedy continuations of prompts decoded together (stopping at eos, like generate).
    chunk: prefill at most this many prompt tokens per step (None: whole prompt).
    margins: if given, receives the top-1 minus top-2 logit of every sampled token."""
    caches = allocate_kv_cache(model.cfg, num_blocks, block_size, dtype or model.dtype, tp_size=model.tp.size)
    free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7)).tolist()
    tables: list[list[int]] = [[] for _ in prompts]
    done_tokens = [0] * len(prompts)  # tokens with KV in the cache
    outs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    with torch.inference_mode():
        while not all(finished):
            ids: list[int] = []
            pos: list[int] = []
            slots: list[int] = []
            qlens: list[int] = []
            clens: list[int] = []
            btabs: list[list[int]] = []
            sample_rows: list[tuple[int, int]] = []  # (sequence, row of its last token)
            for i, p in enumerate(prompts):
                if finished[i]:
                    continue
                c = done_tokens[i]
                toks = p[c:c + (chunk or len(p))] if c < len(p) else [outs[i][-1]]
                while len(tables[i]) * block_size < c + len(toks):
                    tables[i].append(free.pop())
                for j, t in enumerate(toks):
                    ids.append(t)
                    pos.append(c + j)
                    slots.append(tables[i][(c + j) // block_size] * block_size + (c + j) % block_size)
                done_tokens[i] = c + len(toks)
                qlens.append(len(toks))
                clens.append(done_tokens[i])
                btabs.append(tables[i])
                if done_tokens[i] >= len(p):
                    sample_rows.append((i, len(ids) - 1))
            meta = AttentionMetadata(qlens, clens, btabs, torch.tensor(slots), block_size)
            hidden = model(torch.tensor(ids), torch.tensor(pos), meta, caches)
            if not sample_rows:
                continue
            logits = model.compute_logits(hidden[torch.tensor([r for _, r in sample_rows])])
            top = logits.topk(2, dim=-1)
            for (i, _), tok, vals in zip(sample_rows, top.indices[:, 0].tolist(), top.values):
                outs[i].append(tok)
                if margins is not None:
                    margins.append(float(vals[0] - vals[1]))
                if len(outs[i]) >= max_new or tok == eos:
                    finished[i] = True
    return outs


def hf_greedy(hf_model: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    """transformers' generate(do_sample=False) continuation of one prompt."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,  # type: ignore[operator]
                                max_new_tokens=max_new, pad_token_id=0)
    return list(out[0, len(prompt):].tolist())
