"""Attention/expert disaggregation (AFD) of an MoE decode step, MegaScale-Infer style
(Zhu et al., 2025, "MegaScale-Infer: Serving Mixture-of-Experts at Scale with
Disaggregated Expert Parallelism": attention and FFN modules on separate nodes, M:N
dispatch per layer, a ping-pong pipeline over micro-batches). No Ray, no sockets here.

Two sides:
- the **attention side** (``AFDRunner``, a ModelRunner): embeddings, attention over its
  paged KV cache, norms, each layer's router, the combine of the experts' outputs,
  lm_head; the engine's scheduler and sampler run on top of it unchanged;
- the **expert side** (``engine.experts.ExpertShard``): the SwiGLU MLPs of the experts it holds, run
  grouped (one GEMM chain per expert over the rows routed to it).

Between them an ``ExpertExchange``: per MoE layer and micro-batch the attention side
``send``s every shard the rows routed to its experts (grouped by expert) and later
``recv``s their outputs. ``LocalExchange`` runs shards in-process (tests, reference);
cluster transports implement the same two calls.

A placement says which shard holds which experts: ``placement[layer][shard]`` = expert
ids (the ``layers`` of the JSON ``splitserve place-experts`` writes, GPUs = shards); an
expert may sit on several shards (replicas). A token's choice goes to the nearest
replica (lowest ``ExpertExchange.cost``), then the least loaded one in this dispatch;
all rows of one expert go to one replica, so each expert runs one grouped GEMM.

Ping-pong: the batch's sequences are split into ``micro_batches`` parts of about equal
token counts. Per layer, part g's attention runs while the experts work on part g-1's
rows: the attention side sends part g's rows and collects them only when part g
reaches the next layer. With 1 part the step runs in lock-step.

The combine is the monolithic MoE's (engine.model.MoE) operation for operation: choices
sorted stably by expert, each expert's rows weighted and index-added in expert order,
so outputs equal the monolithic engine's (to GEMM rounding when an expert's rows split
differently across micro-batches).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.attention_metadata import AttentionMetadata
from engine.model import CausalLM, MoE
from engine.runner import ModelRunner, StepInput

from engine.experts import (ExpertExchange, ExpertRequest, ExpertShard, LocalExchange, Placement, placement_problems,
                            shard_experts)


@dataclass
class _Dispatch:
    """One layer's routed rows of one micro-batch, sent and awaiting their outputs."""

    layer: int
    tag: int
    residual: torch.Tensor  # h = x + attention(x): [T, hidden]
    tokens: torch.Tensor  # token of each choice, sorted by expert: [T * k]
    weights: torch.Tensor  # float32 weight of each sorted choice: [T * k]
    counts: list[int]  # choices per expert
    # Per shard sent to: positions in the sorted choices its rows fill.
    positions: dict[int, torch.Tensor] = field(default_factory=dict)


def split_micro_batches(meta: AttentionMetadata, parts: int) -> list[tuple[int, int, AttentionMetadata]]:
    """Split a batch by sequence into up to ``parts`` contiguous parts of about equal token
    counts: (first token, end token, the part's metadata)."""
    n = len(meta.query_lens)
    parts = max(1, min(parts, n))
    cum = [0]
    for q in meta.query_lens:
        cum.append(cum[-1] + q)
    # Cut p falls between sequences, nearest to p/parts of the tokens, leaving at least one
    # sequence to every part.
    bounds = [0]
    for p in range(1, parts):
        target = cum[n] * p / parts
        lo, hi = bounds[-1] + 1, n - (parts - p)
        bounds.append(min(range(lo, hi + 1), key=lambda i: (abs(cum[i] - target), i)))
    bounds.append(n)
    out = []
    tok = 0
    for a, b in zip(bounds, bounds[1:]):
        ntok = sum(meta.query_lens[a:b])
        sub = AttentionMetadata(query_lens=meta.query_lens[a:b], context_lens=meta.context_lens[a:b],
                                block_tables=meta.block_tables[a:b],
                                slot_mapping=meta.slot_mapping[tok:tok + ntok], block_size=meta.block_size)
        out.append((tok, tok + ntok, sub))
        tok += ntok
    return out


@dataclass
class StepTimes:
    """Seconds of the attention side in the last step (and totals)."""

    attention_s: float = 0.0  # attention, norms, routing, dispatch and combine
    wait_s: float = 0.0  # blocked in recv: exchange and experts not hidden by other parts
    steps: int = 0
    # CPU time of the attention side's thread in the same two parts: the work itself,
    # whatever else the cores run (wait_cpu_s: the exchange's own cost; with
    # LocalExchange the experts' compute too).
    attention_cpu_s: float = 0.0
    wait_cpu_s: float = 0.0


class AFDRunner(ModelRunner):
    """The attention side: a ModelRunner whose model has no experts; each MoE layer's
    routed rows go through ``exchange``. The engine (scheduler, sampler, KV import) is
    the plain LLMEngine over this runner."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 exchange: ExpertExchange, micro_batches: int = 2) -> None:
        super().__init__(model, kv_caches, block_size)
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches}; allowed: 1 or more")
        cfg = model.cfg
        if not cfg.is_moe:
            raise ValueError(f"{cfg.hf_architecture} is dense: attention/expert disaggregation needs an MoE model")
        if model.tp.size != 1:
            raise ValueError("attention/expert disaggregation runs the attention side with tp=1")
        problems = placement_problems(exchange.placement, cfg.num_hidden_layers, cfg.num_local_experts)
        if problems:
            raise ValueError("placement: " + "; ".join(problems))
        self.exchange = exchange
        self.micro_batches = micro_batches
        self.num_experts = cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        # Holders of every expert, per layer.
        self._holders = [[[s for s, ids in enumerate(layer) if e in ids] for e in range(cfg.num_local_experts)]
                         for layer in exchange.placement]
        # Routed choices per (layer, expert) since start (live expert statistics).
        self.expert_load = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.long)
        self.last = StepTimes()
        self.total = StepTimes()
        self._tags = 0
        # Routing trace (for splitserve place-experts): when a list, each step appends its
        # expert ids [tokens, layers, top_k]; None: not recorded.
        self.trace: list[torch.Tensor] | None = None
        self._step_routes: list[list[torch.Tensor]] = []
        # Held for a whole step: a new placement takes effect between steps only.
        self._step_lock = threading.Lock()

    def routing_trace(self) -> torch.Tensor:
        """The recorded routing, int64 [tokens, layers, top_k] (place-experts' TRACE)."""
        if not self.trace:
            return torch.zeros(0, len(self.kv_caches), self.top_k, dtype=torch.long)
        return torch.cat(self.trace)

    def set_placement(self, placement: Placement) -> None:
        """Route by a new placement from the next step on (waits for a running step); the
        experts must already be loaded where it puts them."""
        cfg = self.model.cfg
        problems = placement_problems(placement, cfg.num_hidden_layers, cfg.num_local_experts)
        if problems:
            raise ValueError("placement: " + "; ".join(problems))
        if len(placement[0]) != self.exchange.num_shards:
            raise ValueError(f"placement over {len(placement[0])} shards; this exchange has "
                             f"{self.exchange.num_shards}")
        holders = [[[s for s, ids in enumerate(layer) if e in ids] for e in range(self.num_experts)]
                   for layer in placement]
        with self._step_lock:
            self.exchange.placement = placement
            self._holders = holders

    def _dispatch(self, layer: int, mlp: MoE, h: torch.Tensor, hn: torch.Tensor) -> _Dispatch:
        weights, experts = mlp.route(hn)
        if self.trace is not None:
            self._step_routes[layer].append(experts)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts_t = torch.bincount(flat, minlength=self.num_experts)
        self.expert_load[layer] += counts_t
        counts = counts_t.tolist()
        self._tags += 1
        d = _Dispatch(layer, self._tags, h, order // self.top_k, weights.reshape(-1).index_select(0, order), counts)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        # Experts to shards: busiest experts first, each to its nearest, then least loaded holder.
        load = [0] * self.exchange.num_shards
        chosen: dict[int, list[int]] = {}
        for e in sorted((e for e in range(self.num_experts) if counts[e]), key=lambda e: -counts[e]):
            holders = self._holders[layer][e]
            s = min(holders, key=lambda s: (self.exchange.cost(s), load[s], s))
            load[s] += counts[e]
            chosen.setdefault(s, []).append(e)
        for s, es in sorted(chosen.items()):
            es.sort()
            pos = torch.cat([torch.arange(starts[e], starts[e + 1]) for e in es])
            d.positions[s] = pos
            req = ExpertRequest(layer, hn.index_select(0, d.tokens.index_select(0, pos)),
                                [(e, counts[e]) for e in es])
            self.exchange.send(s, d.tag, req)
        return d

    def _combine(self, d: _Dispatch) -> torch.Tensor:
        h = d.residual
        y_sorted = torch.empty(d.tokens.shape[0], h.shape[1], dtype=h.dtype)
        for s, pos in d.positions.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            y = self.exchange.recv(s, d.tag)
            self.last.wait_s += time.perf_counter() - t0
            self.last.wait_cpu_s += time.thread_time() - c0
            if y.shape != (pos.shape[0], h.shape[1]):
                raise ValueError(f"expert shard {s} returned {tuple(y.shape)} for {pos.shape[0]} rows")
            y_sorted.index_copy_(0, pos, y.to(h.dtype))
        out = torch.zeros_like(h)
        start = 0
        for n in d.counts:
            if n:
                tok = d.tokens[start:start + n]
                out.index_add_(0, tok, (y_sorted[start:start + n] * d.weights[start:start + n, None]).to(h.dtype))
                start += n
        return h + out

    def forward(self, step: StepInput, hook: Any) -> torch.Tensor:
        if hook is not None:
            raise ValueError("the attention side of AFD does not stream KV out (prefill workers do)")
        with self._step_lock:
            try:
                return self._forward(step)
            except BaseException:
                # Replies still on their way belong to no later step.
                self.exchange.reset()
                raise

    def _forward(self, step: StepInput) -> torch.Tensor:
        t_start, c_start = time.perf_counter(), time.thread_time()
        self.last = StepTimes(steps=1)
        model = self.model
        parts = split_micro_batches(step.meta, self.micro_batches)
        self._step_routes = [[] for _ in model.layers]
        x = model.embed_tokens(step.input_ids)
        if model.rotary.inv_freq.device != x.device:
            model.rotary.to(x.device)
        cos, sin = model.rotary.tables(step.positions, x.dtype)
        xs = [x[a:b] for a, b, _ in parts]
        pending: list[_Dispatch | None] = [None] * len(parts)
        for i, (layer, cache) in enumerate(zip(model.layers, self.kv_caches)):
            for g, (a, b, meta) in enumerate(parts):
                d = pending[g]
                if d is not None:
                    xs[g] = self._combine(d)
                    pending[g] = None
                xg = xs[g]
                h = xg + layer.self_attn(layer.input_layernorm(xg), cos[a:b], sin[a:b], meta, cache)
                hn = layer.post_attention_layernorm(h)
                if isinstance(layer.mlp, MoE):
                    pending[g] = self._dispatch(i, layer.mlp, h, hn)
                else:
                    xs[g] = h + layer.mlp(hn)
        for g, d in enumerate(pending):
            if d is not None:
                xs[g] = self._combine(d)
        out = model.norm(torch.cat(xs) if len(xs) > 1 else xs[0])
        if self.trace is not None and all(self._step_routes):
            self.trace.append(torch.stack([torch.cat(r) for r in self._step_routes], dim=1))
        self.last.attention_s = time.perf_counter() - t_start - self.last.wait_s
        self.last.attention_cpu_s = time.thread_time() - c_start - self.last.wait_cpu_s
        self.total.attention_s += self.last.attention_s
        self.total.wait_s += self.last.wait_s
        self.total.attention_cpu_s += self.last.attention_cpu_s
        self.total.wait_cpu_s += self.last.wait_cpu_s
        self.total.steps += 1
        return out  # type: ignore[no-any-return]


def build_attention_runner(model_dir: str, dtype: str, num_blocks: int, block_size: int,
                           exchange: ExpertExchange, micro_batches: int = 2) -> AFDRunner:
    """The attention side's runner: the model without experts, a KV cache, the exchange."""
    from engine.alloc import tune_malloc
    from engine.engine import DTYPES
    from engine.loader import load_model
    from engine.model import allocate_kv_cache

    tune_malloc()
    torch_dtype = DTYPES[dtype]
    model = load_model(model_dir, torch_dtype, with_experts=False)
    caches = allocate_kv_cache(model.cfg, num_blocks, block_size, torch_dtype)
    return AFDRunner(model, caches, block_size, exchange, micro_batches)


def local_afd_runner(model_dir: str, dtype: str, num_blocks: int, block_size: int, placement: Placement,
                     micro_batches: int = 2) -> AFDRunner:
    """Attention side and every expert shard in this process (tests, reference)."""
    from engine.engine import DTYPES

    shards = [ExpertShard.load_from(model_dir, DTYPES[dtype], shard_experts(placement, s))
              for s in range(len(placement[0]))]
    return build_attention_runner(model_dir, dtype, num_blocks, block_size, LocalExchange(placement, shards),
                                  micro_batches)
