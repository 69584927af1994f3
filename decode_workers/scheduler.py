"""Decode scheduling: continuous batching with admission by free KV blocks.

A request arrives with its prompt KV (from a prefill worker) and is admitted only when
blocks for all its tokens are free, so memory never overflows; decodes run before any
prefill work; a sequence preempted for lack of blocks is recomputed here by chunked
prefill. The colocated baseline is the same scheduler fed whole prompts (Dynamic
SplitFuse, DeepSpeed-FastGen).
"""

from __future__ import annotations

from engine.scheduler import SchedulerConfig


def decode_scheduler_config(max_num_batched_tokens: int, max_num_seqs: int,
                            max_model_len: int) -> SchedulerConfig:
    return SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                           enable_chunked_prefill=True, prefill_only=False,
                           max_model_len=max_model_len)
