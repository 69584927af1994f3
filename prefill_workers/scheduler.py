"""Prefill scheduling: token budget and chunked prefill; a request ends at its first token.

The prefill pool batches prompts under ``max_num_batched_tokens``; prompts longer than
the budget are chunked across steps. It never decodes, so its KV cache only needs to hold
the prompts in flight.
"""

from __future__ import annotations

from engine.scheduler import SchedulerConfig


def prefill_scheduler_config(max_num_batched_tokens: int, max_num_seqs: int,
                             max_model_len: int) -> SchedulerConfig:
    return SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                           enable_chunked_prefill=True, prefill_only=True,
                           max_model_len=max_model_len)
