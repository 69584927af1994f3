"""Turns a scheduled batch into tensors, runs the model, writes/reads paged KV.

``prepare_step`` (rank 0) builds a picklable ``StepInput``; ``ModelRunner.execute`` runs
it on any tensor-parallel rank, each rank holding its share of the KV heads. KV moving in
and out of the cache (disaggregation) travels as full-head tensors
``[layers, 2, tokens, kv_heads, head_dim]``; each rank takes or gives its head slice.
"""

from __future__ import annotations

from collections.abc import Callable
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine import kvcopy
from engine.attention_metadata import AttentionMetadata
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class StepInput:
    # Token ids of the batch, sequences contiguous: LongTensor[T].
    input_ids: torch.Tensor
    # Position of each token in its sequence: LongTensor[T].
    positions: torch.Tensor
    # Paged-KV layout of the batch.
    meta: AttentionMetadata
    # Rows of the hidden states whose logits are needed (last token of sampled seqs).
    logits_indices: torch.Tensor
    # KV to write before the forward: (block table, full-head KV covering its first tokens).
    kv_imports: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    # KV to read after the forward: (request id, block table, number of tokens).
    kv_exports: list[tuple[str, list[int], int]] = field(default_factory=list)
    # KV to hand over layer by layer as it is written: (request id, first token, slots of
    # tokens [first, first + len(slots))), for sequences that stream their KV.
    kv_stream: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    # KV blocks to copy (source, destination) before the forward (forked choices).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Rows of the hidden states whose logits score prompt tokens (prompt logprobs).
    prompt_logits_indices: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long))


@dataclass
class StepResult:
    # float32 [len(logits_indices), vocab] (rank 0; other ranks may return None).
    logits: torch.Tensor | None
    # float32 [len(prompt_logits_indices), vocab], or None when there are none.
    prompt_logits: torch.Tensor | None = None
    # Exported KV by request id, this rank's heads: [layers, 2, tokens, kv_heads_local, hd].
    exported: dict[str, torch.Tensor] = field(default_factory=dict)


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (16-bit floats as int16: numpy has no bfloat16)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.detach().numpy()


@dataclass
class PromptRows:
    """Which prompt tokens the prompt_logits rows of a step score: for each sequence,
    rows [row, row + count) score its prompt tokens first, first + 1, ..."""

    seqs: list[Sequence] = field(default_factory=list)
    rows: list[tuple[int, int, int]] = field(default_factory=list)  # (row, first, count)


def prepare_step(
    batch: ScheduledBatch, block_size: int, export_on_sample: bool = False,
    prompt_rows: PromptRows | None = None,
) -> tuple[StepInput, list[Sequence]]:
    """Build the forward inputs of a batch; also returns the sequences to sample, in the
    order of the logits rows. With export_on_sample, every sampled sequence's KV (all its
    tokens) is read out after the forward (prefill workers). Sequences that want prompt
    logprobs get logits rows for the prompt positions of their chunk, recorded in
    prompt_rows."""
    ids: list[int] = []
    # Flat Python lists, one tensor each at the end (a decode step adds one token per
    # sequence: per-sequence tensor ops cost more than the arithmetic).
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[list[int]] = []
    logits_indices: list[int] = []
    sample_seqs: list[Sequence] = []
    exports: list[tuple[str, list[int], int]] = []
    stream: list[tuple[str, int, torch.Tensor]] = []
    prompt_idx: list[int] = []
    offset = 0
    for seq, n in zip(batch.seqs, batch.num_tokens):
        start = seq.num_computed_tokens
        end = start + n
        if n == 1 and end == seq.num_tokens:
            ids.append(seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[-1])
        else:
            ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        if n == 1:
            slots.append(seq.block_table[start // block_size] * block_size + start % block_size)
        else:
            slots.extend(_slots(seq.block_table, start, end, block_size).tolist())
        query_lens.append(n)
        context_lens.append(end)
        tables.append(list(seq.block_table))
        if seq.params.prompt_logprobs is not None and prompt_rows is not None:
            # Position q's logits score token q + 1: prompt tokens up to the last (whose
            # successor is the first generated token, scored by the sampling row).
            stop = min(end, len(seq.prompt_token_ids) - 1)
            if stop > start:
                prompt_rows.seqs.append(seq)
                prompt_rows.rows.append((len(prompt_idx), start + 1, stop - start))
                prompt_idx.extend(range(offset, offset + stop - start))
        offset += n
        if seq.stream_kv and end > seq.kv_streamed:
            # From kv_streamed, not start: prefix-cache hits were never computed here.
            stream.append((seq.request_id, seq.kv_streamed,
                           _slots(seq.block_table, seq.kv_streamed, end, block_size)))
            seq.kv_streamed = end
        if end == seq.num_tokens:
            logits_indices.append(offset - 1)
            sample_seqs.append(seq)
            if export_on_sample and not seq.stream_kv:
                exports.append((seq.request_id, list(seq.block_table), end))
    imports: list[tuple[list[int], torch.Tensor]] = []
    for seq in batch.kv_imports:
        imports.append((list(seq.block_table), seq.pending_kv))
    step = StepInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        meta=AttentionMetadata(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            block_size=block_size,
        ),
        logits_indices=torch.tensor(logits_indices, dtype=torch.long),
        kv_imports=imports,
        block_copies=list(batch.block_copies),
        kv_exports=exports,
        kv_stream=stream,
        prompt_logits_indices=torch.tensor(prompt_idx, dtype=torch.long),
    )
    return step, sample_seqs


class ModelRunner:
    """Holds one rank's model shard and KV cache; executes StepInputs."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.kv_heads_local = kv_caches[0].shape[3]
        # Layer-wise KV streaming: called (request id, layer, first token, kv [2, n, kvh, hd],
        # a copy) after each layer of a step, for the step's kv_stream entries.
        self.on_layer_kv: Callable[[str, int, int, torch.Tensor], None] | None = None
        # Where exported KV goes: called (request id, shape, dtype) -> a contiguous tensor
        # of that shape to gather into, or None for a fresh one (prefill workers hand out
        # slots of their same-node transfer arena, so the gather is the sender's only copy).
        self.export_into: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor | None] | None = None
        # Given the per-(layer, K/V) word sums of an export into such a tensor, computed in
        # the gather (engine.kvcopy): the arena then publishes the slot without reading it again.
        self.export_sums: Callable[[str, list[int]], None] | None = None
        # The compiled pure-decode forward (engine.compiled), when enabled and supported.
        self.compiled: Any = None

    def _head_slice(self) -> slice:
        lo = self.tp_rank * self.kv_heads_local
        return slice(lo, lo + self.kv_heads_local)

    def import_kv(self, block_table: list[int], kv: torch.Tensor) -> None:
        """kv: [layers, 2, tokens, kv_heads (all ranks), head_dim], the first tokens of the
        sequence whose blocks block_table lists."""
        for layer in range(len(self.kv_caches)):
            self.write_kv(block_table, layer, 0, kv[layer])

    def write_kv(self, block_table: list[int], layer: int, first: int, kv: torch.Tensor,
                 part: int | None = None, checksum: bool = False) -> int | None:
        """Write one layer's KV of tokens ``first .. first + n`` (``kv``: ``[2, n, kv_heads
        (all ranks), head_dim]``; with ``part`` 0 or 1, only the keys or the values,
        ``[n, kv_heads, head_dim]``) into the blocks of ``block_table``. Safe beside a running
        step as long as no scheduled sequence holds those blocks (the decode worker admits
        into reserved blocks off the engine thread).

        With numba (engine.kvcopy): one fused loop per K and V moves every token's row and
        sums its 64-bit words (GIL released); returns that sum when ``checksum`` (the
        same-node transfer's checksum, computed in the copy), else None. Otherwise whole
        blocks move with one numpy fancy assignment per K and V, partial blocks at either
        end by slices, and None is returned."""
        cache = self.kv_caches[layer]
        n = kv.shape[1] if part is None else kv.shape[0]
        if n == 0:
            return 0 if checksum else None
        fused = self._write_fused(block_table, cache, first, kv, part)
        if fused is not None:
            return fused if checksum else None
        if part is not None:
            kv, cache = kv.unsqueeze(0), cache[part: part + 1]
        bs = self.block_size
        if kv.shape[2] != self.kv_heads_local:
            kv = kv[:, :, self._head_slice()]
        c, s = _np(cache), _np(kv.to(cache.dtype))
        pos, i = first, 0
        if pos % bs:  # head: the rest of a partly written block
            k = min(n, bs - pos % bs)
            c[:, block_table[pos // bs], pos % bs: pos % bs + k] = s[:, :k]
            pos, i = pos + k, k
        full = (n - i) // bs
        if full:
            ids = np.asarray(block_table[pos // bs: pos // bs + full], dtype=np.int64)
            rows = s[:, i: i + full * bs].reshape(len(s), full, bs, *s.shape[2:])
            for j in range(len(s)):
                c[j][ids] = rows[j]
            pos, i = pos + full * bs, i + full * bs
        if i < n:  # tail: the start of the last block
            c[:, block_table[pos // bs], : n - i] = s[:, i:]
        return None

    def _write_fused(self, block_table: list[int], cache: torch.Tensor, first: int, kv: torch.Tensor,
                     part: int | None) -> int | None:
        """write_kv through engine.kvcopy's scatter: the words' sum, or None where it does
        not apply (no numba, another dtype, heads of several ranks, not contiguous)."""
        if (kv.dtype != cache.dtype or kv.shape[-2] != self.kv_heads_local or not cache.is_contiguous()
                or not kvcopy.available()):
            return None
        parts = [(part, kv)] if part is not None else [(0, kv[0]), (1, kv[1])]
        srcs, dsts = [], []
        for j, src in parts:
            if not src.is_contiguous():
                return None
            s = kvcopy.words(_np(src), src.shape[0])
            c = self._cache_words(cache, j)
            if s is None or c is None:
                return None
            srcs.append(s)
            dsts.append(c)
        # A numpy table (admission converts its block list once) is used as it is.
        table = np.asarray(block_table, dtype=np.int64)
        total = 0
        for s, c in zip(srcs, dsts):
            total += kvcopy.scatter_sum(c, s, table, first, self.block_size)
        return total & 0xFFFFFFFFFFFFFFFF

    def _cache_words(self, cache: torch.Tensor, j: int) -> np.ndarray | None:
        """cache[j] as kvcopy's [blocks * block_size, words] uint64 view (made once per
        cache tensor and part)."""
        memo = self.__dict__.setdefault("_words_memo", {})
        key = (cache.data_ptr(), j)
        got = memo.get(key)
        if got is None or got[0] is not cache:
            got = memo[key] = (cache, kvcopy.words(_np(cache[j]), cache.shape[1] * cache.shape[2]))
        return got[1]

    def export_kv(self, block_table: list[int], num_tokens: int, out: torch.Tensor | None = None,
                  sums: list[int] | None = None) -> torch.Tensor:
        """This rank's heads of the first num_tokens of a sequence: [layers, 2, tokens, kvh, hd]
        (into ``out`` when given: e.g. a slot of the KV transfer's shared memory). With
        ``sums`` (a list) and numba (engine.kvcopy), the gather also sums each (layer, K or
        V) row's 64-bit words in the same pass and appends them, layer-major; ``sums``
        stays empty where that does not apply."""
        bs, c0 = self.block_size, self.kv_caches[0]
        full, rem = divmod(num_tokens, bs)
        if out is None:
            out = torch.empty(len(self.kv_caches), 2, num_tokens, c0.shape[3], c0.shape[4], dtype=c0.dtype)
        if num_tokens and self._export_fused(block_table, num_tokens, out, sums):
            return out
        blocks = torch.tensor(block_table[:full], dtype=torch.long)
        for layer, cache in enumerate(self.kv_caches):
            for j in (0, 1):
                if full:
                    torch.index_select(cache[j], 0, blocks,
                                       out=out[layer, j, : full * bs].view(full, bs, *c0.shape[3:]))
                if rem:
                    out[layer, j, full * bs:] = cache[j, block_table[full], :rem]
        return out

    def _export_fused(self, block_table: list[int], num_tokens: int, out: torch.Tensor,
                      sums: list[int] | None) -> bool:
        c0 = self.kv_caches[0]
        if (not out.is_contiguous() or out.dtype != c0.dtype or not c0.is_contiguous()
                or not kvcopy.available()):
            return False
        rows = c0.shape[1] * c0.shape[2]
        table = np.asarray(block_table[: -(-num_tokens // self.block_size)], dtype=np.int64)
        got = []
        for layer, cache in enumerate(self.kv_caches):
            for j in (0, 1):
                o = kvcopy.words(_np(out[layer, j]), num_tokens)
                c = kvcopy.words(_np(cache[j]), rows)
                if o is None or c is None:
                    return False  # nothing written yet for layer 0; same shapes for every layer
                got.append(kvcopy.gather_sum(o, c, table, self.block_size))
        if sums is not None:
            sums.extend(got)
        return True

    def _export_buffer(self, request_id: str, num_tokens: int) -> torch.Tensor | None:
        if self.export_into is None or self.tp_size > 1:
            return None
        c0 = self.kv_caches[0]
        shape = (len(self.kv_caches), 2, num_tokens, c0.shape[3], c0.shape[4])
        try:
            return self.export_into(request_id, shape, c0.dtype)
        except Exception:  # noqa: BLE001 - the export still happens, into a fresh tensor
            return None

    def forward(self, step: StepInput, hook: Callable[[int], None] | None) -> torch.Tensor:
        """Final-normed hidden states of the step's tokens (engine.afd overrides this)."""
        return self.model(step.input_ids, step.positions, step.meta, self.kv_caches, hook)  # type: ignore[no-any-return]

    def enable_compile(self) -> bool:
        """Use engine.compiled for pure decode steps (compiled at the first one)."""
        from engine.compiled import CompiledDecode

        if self.tp_size > 1 or not CompiledDecode.supports(self.model):
            return False
        self.compiled = CompiledDecode(self.model, self.kv_caches)
        return True

    def _compiled_logits(self, step: StepInput) -> torch.Tensor | None:
        """Logits of a pure decode step (every token sampled) through the compiled
        forward, or None when it does not apply or fails (then eager from now on)."""
        c, meta = self.compiled, step.meta
        if (c is None or c.broken is not None or not meta.is_pure_decode or step.prompt_logits_indices.numel()
                or len(step.logits_indices) != len(step.input_ids)):
            return None
        try:
            return c(step.input_ids, step.positions, meta.slot_mapping, meta.block_tables,  # type: ignore[no-any-return]
                     meta.context_lens)
        except Exception as e:  # noqa: BLE001 - compile errors vary; the eager path is the fallback
            c.broken = f"{type(e).__name__}: {e}"
            logger.warning("compiled decode failed, staying eager: %s", c.broken)
            return None

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepResult:
        if step.block_copies:
            # First: a source block freed since the fork may be reused by this step's imports.
            src = torch.tensor([s for s, _ in step.block_copies], dtype=torch.long)
            dst = torch.tensor([d for _, d in step.block_copies], dtype=torch.long)
            for cache in self.kv_caches:
                cache[:, dst] = cache[:, src]
        for table, kv in step.kv_imports:
            self.import_kv(table, kv)
        logits = prompt_logits = None
        hook = None
        if step.kv_stream and self.on_layer_kv is not None:
            sink = self.on_layer_kv

            def hook(layer: int) -> None:
                flat = self.kv_caches[layer].flatten(1, 2)  # [2, blocks * block_size, kvh, hd]
                for rid, first, slots in step.kv_stream:
                    sink(rid, layer, first, flat.index_select(1, slots))
        if step.input_ids.numel() and hook is None and self.compiled is not None:
            logits = self._compiled_logits(step)
        if step.input_ids.numel() and logits is None:
            hidden = self.forward(step, hook)
            idx = step.logits_indices
            rows = hidden if len(idx) == len(hidden) and step.meta.is_pure_decode else hidden[idx]
            logits = self.model.compute_logits(rows)
            if step.prompt_logits_indices.numel():
                prompt_logits = self.model.compute_logits(hidden[step.prompt_logits_indices])
        exported = {}
        for rid, table, n in step.kv_exports:
            buf = self._export_buffer(rid, n)
            sums: list[int] | None = [] if buf is not None and self.export_sums is not None else None
            exported[rid] = self.export_kv(table, n, buf, sums)
            if sums and self.export_sums is not None:
                self.export_sums(rid, sums)
        return StepResult(logits=logits, exported=exported, prompt_logits=prompt_logits)
