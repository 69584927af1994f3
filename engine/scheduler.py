"""Continuous-batching scheduler with chunked prefill. Pure bookkeeping: no tensors.

Each step it builds one batch under a token budget:
1. running sequences first, decode tokens before prefill chunks (decode latency is what
   TPOT SLOs protect); a sequence that needs a new KV block when none is free preempts
   the youngest running sequence, whose KV is dropped and later recomputed;
2. then waiting sequences in arrival order, as long as their blocks fit. A waiting
   sequence that does not fit blocks those behind it (FCFS, no starvation).

A sequence that carries KV from elsewhere (``pending_kv``) is admitted with blocks for
all its tokens and its KV marked computed; the runner writes that KV in before the
forward pass. The prefill-only mode (prefill workers) finishes a sequence as soon as its
first token is sampled.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager, NoFreeBlocksError
from engine.sequence import Sequence, SeqStatus


class RequestTooLargeError(ValueError):
    """A request that can never fit in this worker's KV cache or context."""


@dataclass
class SchedulerConfig:
    # Tokens per step across the batch (prefill chunks + decode tokens).
    max_num_batched_tokens: int = 512
    # Sequences running at once.
    max_num_seqs: int = 64
    # Split long prompts into chunks that share steps with decodes (Sarathi / SplitFuse).
    enable_chunked_prefill: bool = True
    # Finish sequences once their first token is sampled (prefill workers).
    prefill_only: bool = False
    # Longest sequence (prompt + output) the model allows.
    max_model_len: int = 2048


@dataclass
class ScheduledBatch:
    # Sequences in this step, in the order of their tokens in the batch.
    seqs: list[Sequence] = field(default_factory=list)
    # Tokens each sequence computes this step.
    num_tokens: list[int] = field(default_factory=list)
    # Sequences whose pending KV must be written into their blocks before the forward.
    kv_imports: list[Sequence] = field(default_factory=list)
    # Sequences preempted by this step (their KV is gone; they wait to be recomputed).
    preempted: list[Sequence] = field(default_factory=list)
    # KV blocks to copy (source, destination) before the forward: forked partial blocks.
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._copies: list[tuple[int, int]] = []
        # Prompt tokens computed by forward passes (a prompt shared by forked choices
        # counts once); tests and metrics read it.
        self.prompt_tokens_computed = 0

    # -- requests ---------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise RequestTooLargeError if such a request could never complete here."""
        total = num_prompt_tokens + max_tokens
        if total > self.config.max_model_len:
            raise RequestTooLargeError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds the model's context of {self.config.max_model_len} tokens"
            )
        capacity = self.bm.num_blocks * self.bm.block_size
        needed = num_prompt_tokens if self.config.prefill_only else total
        if needed > capacity:
            raise RequestTooLargeError(
                f"request needs {needed} KV slots but this worker's cache holds {capacity} "
                f"({self.bm.num_blocks} blocks of {self.bm.block_size})"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt_token_ids), seq.params.max_tokens)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq (stop condition, abort, error) and release its blocks."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.pending_kv = None
        self.bm.free(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run child (another choice of parent's prompt, its first token already in its
        output) on the prompt KV parent holds: shared full blocks, a copied partial one.
        Without a free block for the copy it waits and recomputes (prefix cache hits)."""
        try:
            copy = self.bm.fork(parent, child, len(parent.prompt_token_ids))
        except NoFreeBlocksError:
            child.status = SeqStatus.WAITING
            self.waiting.append(child)
            return
        if copy is not None:
            self._copies.append(copy)
        child.status = SeqStatus.RUNNING
        child.first_scheduled_time = parent.first_scheduled_time
        self.running.append(child)

    # -- scheduling -------------------------------------------------------------------
    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SeqStatus.WAITING
        seq.pending_kv = None  # any imported KV is gone with the blocks: recompute
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(block_copies=self._copies)
        self._copies = []
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        # Running sequences: decodes first, then unfinished prefill chunks.
        order = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.config.enable_chunked_prefill and n < seq.num_uncomputed_tokens:
                continue
            while not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                # Youngest sequence not already in this batch (possibly seq itself).
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            scheduled.add(id(seq))
            budget -= n

        # Waiting sequences, FCFS.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.pending_kv is not None:
                # KV arrives whole: blocks for every token, then decode the last one.
                if not self.bm.can_allocate(seq, seq.num_tokens):
                    break
                self.bm.allocate(seq, seq.num_tokens)
                seq.num_computed_tokens = seq.num_pending_kv_tokens
                batch.kv_imports.append(seq)
                n = min(seq.num_uncomputed_tokens, budget)
            else:
                if not seq.block_table and seq.params.prompt_logprobs is None:
                    # (Prompt logprobs need every prompt position computed: no prefix reuse.)
                    seq.num_cached_tokens = self.bm.match_prefix(seq)
                    seq.num_computed_tokens = seq.num_cached_tokens
                n = min(seq.num_uncomputed_tokens, budget)
                chunk_ok = self.config.enable_chunked_prefill or n == seq.num_uncomputed_tokens
                if not chunk_ok or not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                    if not batch.seqs and not self.running and not chunk_ok:
                        n = seq.num_uncomputed_tokens  # lone long prompt: run it whole
                        if not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                            self.bm.free(seq)
                            break
                    else:
                        self.bm.free(seq)  # give back prefix-cache hits; retry next step
                        break
                self.bm.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            if n > 0:
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens, finish what is done.

        ``sampled`` maps request_id to the token sampled for sequences whose chunk reached
        their last token. Returns the sequences that finished in this step.
        """
        finished: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.prompt_tokens_computed += max(
                0, min(seq.num_computed_tokens + n, len(seq.prompt_token_ids)) - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.bm.seal_full_blocks(seq)
            token = sampled.get(seq.request_id)
            if token is None:
                continue
            seq.output_token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        for seq in batch.kv_imports:
            seq.pending_kv = None
        return finished

    def stop_reason(self, seq: Sequence, token: int) -> str | None:
        return self._stop_reason(seq, token)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if self.config.prefill_only:
            return "prefill_done"
        if token in seq.eos_token_ids or token in seq.params.stop_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            return "length"
        if seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None
