"""What a forward pass needs to know about the batch: the paged-KV layout of each sequence.

A batch is a flat run of tokens from several sequences (prefill chunks and decode tokens
mixed). Tokens of one sequence are contiguous in ``input_ids`` and sequences appear in
the order of the lists below. The KV cache of every layer is a tensor
``[2, num_blocks, block_size, num_kv_heads_local, head_dim]`` (2 = key, value); a token's
K/V lives at slot ``block_id * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    # Tokens each sequence contributes to this step (a prefill chunk, or 1 for decode).
    query_lens: list[int]
    # Tokens with KV for each sequence once this step has run: computed before + query_len.
    context_lens: list[int]
    # Physical block ids of each sequence, in order; covers at least context_lens[i] tokens.
    block_tables: list[list[int]]
    # LongTensor[T]: the cache slot into which each input token's K/V is written.
    slot_mapping: torch.Tensor
    # Tokens per KV block.
    block_size: int
    # What every layer's attention derives from the fields above (index tensors, masks),
    # built by the first layer of a forward and reused by the others (engine.attention).
    plan: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_pure_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)
