"""The pure-decode forward of a dense model through ``torch.compile`` (inductor), opt-in.

A SmolLM2 decode step in eager PyTorch dispatches ~5000 aten ops (30 layers of norms,
rotary, KV write, gather, attention, SwiGLU): at a few microseconds each that is a large
share of a step whose matmuls read ~540 MB of fp32 weights (benchmarks/results/
2026-12-06-speed). Compiled, the elementwise work of a layer fuses into a few generated
C++ kernels and the step runs through one generated wrapper. vLLM's CPU backend does the
same (torch.compile with inductor around its own C++ ops).

What is compiled: embedding -> 30 x (RMSNorm, q/k/v, rotary, attention, o_proj,
residual, RMSNorm, SwiGLU, residual) -> final norm -> lm_head, for a batch of B decode
tokens (B dynamic: one graph for B = 1, one for B >= 2). The gathered context is padded to
a multiple of ``BLOCK_PAD`` blocks (masked keys) so its length is dynamic from the first
call too. Linears pre-packed for oneDNN (engine.linear) stay opaque to the compiler: they
are called through the custom op ``splitserve::packed_linear`` (the packed tensor is
looked up by a constant id); plain weights go through ``F.linear`` inside the graph.
Attention is opaque too (the custom op ``splitserve::decode_attention``: the eager KV
write, block gather and SDPA of engine.attention, the cache written in place), as vLLM
keeps its paged-attention kernel out of the compiled graph.

Measured on SmolLM2 fp32, one thread (benchmarks/results/2026-12-06-speed, session 9): no
faster than eager (0.99x at batch 1, 0.87x at batch 8): the step is bound by reading
the weights, so it stays off by default.

Not bit-identical to the eager path: inductor's reductions (RMSNorm's mean) and its
vectorised elementwise code round differently (~1e-7 relative in fp32). ``SPLITSERVE_COMPILE``: ``off`` (default) or
``decode``. Anything the compiled path does not cover (prefill chunks, MoE, tensor
parallel, a step with layer hooks) runs eager; if compiling or running the graph raises,
the runner logs it and stays eager from then on.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention import _decode_planned, write_kv
from engine.linear import PackedWeight

logger = logging.getLogger(__name__)

ENV = "SPLITSERVE_COMPILE"
MODES = ("off", "decode")
# The gathered context of a step is padded to a multiple of this many blocks.
BLOCK_PAD = 4

_ids = itertools.count()
_PACKED: "weakref.WeakValueDictionary[int, PackedWeight]" = weakref.WeakValueDictionary()


def compile_mode() -> str:
    mode = os.environ.get(ENV, "off").strip().lower() or "off"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: allowed {', '.join(MODES)}")
    return mode


@torch.library.custom_op("splitserve::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight_id: int) -> torch.Tensor:
    """x W^T through the PackedWeight registered under weight_id (engine.linear)."""
    return _PACKED[weight_id](x)


@packed_linear.register_fake
def _packed_linear_fake(x: torch.Tensor, weight_id: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _PACKED[weight_id].out_features)


@torch.library.custom_op("splitserve::decode_attention", mutates_args=("cache",))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                     table: torch.Tensor, lens: torch.Tensor, mask: torch.Tensor, scale: float,
                     window: int) -> torch.Tensor:
    """Decode attention of one layer: write k/v [B, kvh, hd] at their slots, then attend
    over each sequence's blocks (table [B, nblk], context lengths lens [B]): through the
    paged kernel (engine.paged_kernel: fp32 on CPU, reads the cache in place) when it
    applies, else engine.attention's gather + SDPA with the additive key mask
    [B, 1, 1, L]. q [B, heads, hd] -> [B, heads * hd]. Opaque to the compiler: the cache
    is written in place."""
    write_kv(cache, k, v, slots)
    b = q.shape[0]
    from engine.paged_kernel import paged_decode, wanted

    if wanted(cache.dtype, cache.device):
        return paged_decode(q, cache, table, lens, scale, window or None).reshape(b, -1)
    out = _decode_planned(q, cache, (table.reshape(-1), table.shape[1], mask), scale)
    return out.reshape(b, -1)


@decode_attention.register_fake
def _decode_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                           slots: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, mask: torch.Tensor,
                           scale: float, window: int) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _register(p: PackedWeight) -> int:
    wid = getattr(p, "_compile_id", None)
    if wid is None:
        wid = next(_ids)
        p._compile_id = wid  # type: ignore[attr-defined]
        _PACKED[wid] = p
    return wid


def _linear_fn(mod: Any) -> Any:
    """A function x -> x W^T for a linear of engine.tp (packed or plain) or the lm_head."""
    packed = getattr(mod, "packed", None)
    if packed is not None:
        wid = _register(packed)
        return lambda x: packed_linear(x, wid)
    weight = mod.weight
    return lambda x: F.linear(x, weight)


def _rms(norm: Any, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(x.dtype)


class CompiledDecode:
    """The compiled decode forward of one model (its weights) over its KV caches."""

    def __init__(self, model: Any, kv_caches: list[torch.Tensor]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = kv_caches[0].shape[2]
        cfg = model.cfg
        self.window = cfg.sliding_window
        a0 = model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim, self.scale = a0.heads, a0.kv_heads, a0.head_dim, a0.scale
        self.layers = [(layer.input_layernorm, _linear_fn(layer.self_attn.qkv_proj), _linear_fn(layer.self_attn.o_proj),
                        layer.post_attention_layernorm, _linear_fn(layer.mlp.gate_up_proj),
                        _linear_fn(layer.mlp.down_proj)) for layer in model.layers]
        if model.lm_head_packed is not None:
            wid = _register(model.lm_head_packed)
            self.lm_head = lambda x: packed_linear(x, wid)
        else:
            lw = model.lm_head_weight
            self.lm_head = lambda x: F.linear(x, lw)
        # Sizes dynamic where marked (batch >= 2, context blocks), everything else (the
        # weight ids, head counts, the caches' shapes) constant.
        self.fn = torch.compile(self._forward, dynamic=None, fullgraph=True,
                                options={"cpp.dynamic_threads": True})
        self.broken: str | None = None  # why the compiled path was given up, if it was
        self.calls = 0  # decode steps run compiled

    @staticmethod
    def supports(model: Any) -> bool:
        return (not model.cfg.is_moe and model.tp.size == 1 and getattr(model, "with_experts", True)
                and all(hasattr(layer.mlp, "gate_up_proj") for layer in model.layers))

    def _forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 table: torch.Tensor, lens: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        model = self.model
        b = input_ids.shape[0]
        h, kvh, hd = self.heads, self.kv_heads, self.head_dim
        length = table.shape[1] * self.block_size
        k_pos = torch.arange(length, device=input_ids.device)[None, :]
        vis = k_pos < lens[:, None]
        if self.window is not None:
            vis = vis & (k_pos > lens[:, None] - 1 - self.window)
        mask = torch.zeros(vis.shape, dtype=cos.dtype).masked_fill(~vis, float("-inf"))[:, None, None, :]
        half = hd // 2
        x = model.embed_tokens(input_ids)
        for (n1, qkv_l, o_l, n2, gu_l, down_l), cache in zip(self.layers, caches):
            qkv = qkv_l(_rms(n1, x))
            qk = qkv[:, :(h + kvh) * hd].view(b, h + kvh, hd)
            qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], dim=-1) * sin
            q, k = qk[:, :h], qk[:, h:]
            v = qkv[:, (h + kvh) * hd:].view(b, kvh, hd)
            o = decode_attention(q, k, v, cache, slots, table, lens, mask, self.scale, self.window or 0)
            x = x + o_l(o)
            gate, up = gu_l(_rms(n2, x)).chunk(2, dim=-1)
            x = x + down_l(F.silu(gate) * up)
        return self.lm_head(_rms(model.norm, x)).float()

    def inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               tables: list[list[int]], ctx: list[int]) -> tuple[torch.Tensor, ...]:
        bs = self.block_size
        nblk = max(-(-c // bs) for c in ctx)
        nblk = -(-nblk // BLOCK_PAD) * BLOCK_PAD
        rows = []
        for t, c in zip(tables, ctx):
            used = t[: -(-c // bs)]
            rows.append(used + [0] * (nblk - len(used)))  # padding reads block 0, masked out
        cos, sin = self.model.rotary.tables(positions, self.model.dtype)
        table, lens = torch.tensor(rows, dtype=torch.long), torch.tensor(ctx, dtype=torch.long)
        mark = torch._dynamo.maybe_mark_dynamic
        if len(ctx) > 1:  # batch 1 has its own graph (torch specialises sizes 0 and 1)
            for t in (input_ids, cos, sin, slots, table, lens):
                mark(t, 0)
        mark(table, 1)
        return input_ids, cos, sin, slots, table, lens

    def warmup(self) -> float:
        """Compile both graphs (batch 1 and batch >= 2) before serving, so that no request
        waits for the compiler; returns the seconds it took. Writes garbage K/V into slots
        0 and 1 of block 0: call it before any sequence holds blocks."""
        import time

        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in (1, 2):
                ids = torch.zeros(b, dtype=torch.long)
                self(ids, ids.clone(), torch.arange(b), [[0]] * b, [1] * b)
        self.calls = 0
        return time.perf_counter() - t0

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 tables: list[list[int]], ctx: list[int]) -> torch.Tensor:
        """float32 logits [B, vocab] of a pure decode step (one token per sequence)."""
        out = self.fn(*self.inputs(input_ids, positions, slots, tables, ctx), self.kv_caches)
        self.calls += 1
        return out  # type: ignore[no-any-return]
