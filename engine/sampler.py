"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from engine.sequence import SamplingParams


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._default_gen = torch.Generator().manual_seed(seed)
        # Private generators of seeded requests, by request id.
        self._gens: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._gens.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._default_gen
        gen = self._gens.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(params.seed)
            self._gens[request_id] = gen
        return gen

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> list[int]:
        """logits: float32 [N, vocab], one row per sequence to sample."""
        out: list[int] = [0] * len(params)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            tokens = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, tokens):
                out[i] = int(t)
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = logits[i].float() / p.temperature
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
            gen = self._generator(request_ids[i], p)
            out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
        return out
