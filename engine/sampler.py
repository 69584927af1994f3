"""Token sampling: logits processors (logit bias, min_tokens, repetition / frequency /
presence penalties), greedy, temperature, top-k, top-p, per-request seeds, and
log-probabilities of the raw logits.

Everything a processor needs is in the sequence itself (prompt and generated ids, the
number generated), and a seeded request draws its i-th token from a generator seeded by
(seed, i): so a prefill worker that samples the first token and a decode worker that
samples the rest give what one colocated worker gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sequence import Sequence

_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, index: int) -> int:
    """Seed of the generator that draws the index-th generated token of a request seeded
    with seed (splitmix64 of the pair; the same everywhere the token may be sampled)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


# One sampled (or prompt) token's log-probabilities: (its logprob, top ids, top logprobs).
TokenLogprobs = tuple[float, list[int], list[float]]


@dataclass
class SampleOutput:
    tokens: list[int]
    # Per row: None, or the sampled token's logprobs (params.logprobs set).
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Log-softmax of raw logits [N, vocab]: each row's target logprob and its top k."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, targets.view(-1, 1)).squeeze(1).tolist()
    if k > 0:
        top = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
        ids, vals = top.indices.tolist(), top.values.tolist()
    else:
        ids = vals = [[] for _ in chosen]
    return [(c, i, v) for c, i, v in zip(chosen, ids, vals)]


def apply_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The logits after logit_bias, min_tokens and the penalties (in vLLM's order), batched
    over the rows that use them; returns logits itself when no row does. Work is in the
    tokens each row has seen (flat indices into the logits), not in the vocabulary."""
    rows = [i for i, s in enumerate(seqs) if s.params.needs_processing]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    flat = logits.view(-1)
    for i in rows:
        s, p = seqs[i], seqs[i].params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), dtype=torch.long)
            logits[i].index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype))
        if len(s.output_token_ids) < p.min_tokens:
            stops = set(p.stop_token_ids) | set(s.eos_token_ids)
            if stops:
                logits[i, torch.tensor(sorted(stops), dtype=torch.long)] = float("-inf")
    rep = [i for i in rows if seqs[i].params.repetition_penalty != 1.0]
    if rep:
        # Each (row, token) seen in the prompt or output once, as a flat index.
        idx = torch.cat([i * vocab + torch.tensor(seqs[i].token_ids, dtype=torch.long).unique() for i in rep])
        pen = torch.cat([torch.full((len(set(seqs[i].token_ids)),), seqs[i].params.repetition_penalty,
                                    dtype=logits.dtype) for i in rep])
        vals = flat[idx]
        flat[idx] = torch.where(vals > 0, vals / pen, vals * pen)
    occ = [i for i in rows if (seqs[i].params.frequency_penalty or seqs[i].params.presence_penalty)
           and seqs[i].output_token_ids]
    if occ:
        idx, counts = torch.cat([i * vocab + torch.tensor(seqs[i].output_token_ids, dtype=torch.long)
                                 for i in occ]).unique(return_counts=True)
        row = idx // vocab
        freq = torch.zeros(len(seqs), dtype=logits.dtype)
        pres = torch.zeros(len(seqs), dtype=logits.dtype)
        for i in occ:
            freq[i] = seqs[i].params.frequency_penalty
            pres[i] = seqs[i].params.presence_penalty
        flat.index_add_(0, idx, -(freq[row] * counts.to(logits.dtype) + pres[row]))
    return logits


class Sampler:
    def __init__(self, seed: int = 0, model_dir: str | None = None) -> None:
        self._default_gen = torch.Generator().manual_seed(seed)
        # Structured output: the model's tokenizer for grammars (built when first needed)
        # and each guided request's matcher.
        self._model_dir = model_dir
        self._gtok: Any = None
        self._guides: dict[str, Any] = {}

    def forget(self, request_id: str) -> None:
        """Drop a finished request's grammar matcher (seeded generators are per token)."""
        self._guides.pop(request_id, None)

    def _guide(self, seq: Sequence) -> Any:
        from engine.guided import GrammarTokenizer, Guide

        guide = self._guides.get(seq.request_id)
        if guide is None:
            if self._model_dir is None:
                raise ValueError("structured output needs the engine's model_dir (its tokenizer)")
            if self._gtok is None:
                self._gtok = GrammarTokenizer(self._model_dir)
            guide = self._guides[seq.request_id] = Guide(self._gtok, seq.params.grammar or "")
        guide.catch_up(seq.output_token_ids)
        return guide

    def _apply_grammars(self, logits: torch.Tensor, raw: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.grammar]
        if not rows:
            return logits
        if logits is raw:
            logits = logits.clone()
        for i in rows:
            allowed = self._guide(seqs[i]).allowed(logits.shape[1])
            row = logits[i].masked_fill(~allowed, float("-inf"))
            if not torch.isfinite(row).any():  # processors banned all the grammar allows
                row = raw[i].masked_fill(~allowed, float("-inf"))
            logits[i] = row
        return logits

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self._default_gen
        return torch.Generator().manual_seed(stream_seed(seq.params.seed, len(seq.output_token_ids)))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        """logits: float32 [N, vocab], one row per sequence to sample (raw model output)."""
        params = [s.params for s in seqs]
        processed = self._apply_grammars(apply_processors(logits, seqs), logits, seqs)
        out: list[int] = [0] * len(params)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            rows = processed if len(greedy) == len(params) else processed[greedy]
            tokens = rows.argmax(dim=-1).tolist()
            for i, t in zip(greedy, tokens):
                out[i] = int(t)
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = processed[i].float() / p.temperature
            # An extreme penalty or temperature can overflow a logit: +inf keeps the lead
            # (the largest finite value), NaN drops out; softmax stays a distribution.
            row = torch.nan_to_num(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)
            if p.top_k and p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1.0:
                sorted_p, idx = torch.sort(probs, descending=True)
                cum = torch.cumsum(sorted_p, dim=-1)
                # Keep tokens until the mass before them reaches top_p (always the first).
                drop = (cum - sorted_p) >= p.top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
            out[i] = int(torch.multinomial(probs, 1, generator=self._generator(seqs[i])).item())
        lps: list[TokenLogprobs | None] = [None] * len(params)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            k = max(params[i].logprobs or 0 for i in want)
            idx = torch.tensor(want, dtype=torch.long)
            got = token_logprobs(logits[idx], torch.tensor([out[i] for i in want]), k)
            for i, (c, ids, vals) in zip(want, got):
                n = params[i].logprobs or 0
                lps[i] = (c, ids[:n], vals[:n])
        return SampleOutput(out, lps)
