"""Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) and the
Mixtral sparse-MoE block, in plain PyTorch over a paged KV cache, tensor-parallel
through engine.tp. The math follows transformers' Llama/Mixtral step for step, so fp32
results agree with it to rounding.

Parameters are named after the HF checkpoint (q_proj, gate_proj, ...); engine.loader maps
checkpoint keys onto them, each rank taking its slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import paged_attention, write_kv
from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.linear import PackedWeight, linear
from engine.rope import Rotary, rotate
from engine.tp import MergedColumnParallelLinear, RowParallelLinear, TPContext


def _frozen(*shape: int, dtype: torch.dtype, fill: float | None = None) -> nn.Parameter:
    t = torch.empty(shape, dtype=dtype) if fill is None else torch.full(shape, fill, dtype=dtype)
    return nn.Parameter(t, requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _frozen(n, dtype=dtype, fill=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # transformers' LlamaRMSNorm in fp32 (its casts are no-ops), the same kernels in
            # fewer dispatches: x * rsqrt(mean(x^2) + eps), then times the weight.
            r = x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
            return (x * r).mul_(self.weight)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention; this rank holds heads/tp query heads and kv_heads/tp KV heads."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        hd, h, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.heads = tp.split(h, "attention heads")[1]
        self.kv_heads = tp.split(kvh, "key-value heads")[1]
        self.head_dim = hd
        self.scale = hd ** -0.5
        self.sliding_window = cfg.sliding_window
        # q, k and v in one matmul (checkpoint q_proj/k_proj/v_proj are its row blocks).
        self.qkv_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [(h * hd, "attention heads", hd), (kvh * hd, "key-value heads", hd),
                              (kvh * hd, "key-value heads", hd)], tp, dtype)
        self.o_proj = RowParallelLinear(h * hd, cfg.hidden_size, tp, dtype, "attention heads", units=hd)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        t, h, kvh, hd = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # Rotate q and k heads together (elementwise: the same values as one by one);
        # cos and sin are Rotary.tables' [T, 1, hd] (sin signed).
        qk = rotate(qkv[:, :(h + kvh) * hd].view(t, h + kvh, hd), cos, sin)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * hd:].view(t, kvh, hd)
        write_kv(cache, k, v, meta.slot_mapping)
        o = paged_attention(q, cache, meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the intermediate dimension is split across ranks."""

    def __init__(self, hidden: int, intermediate: int, tp: TPContext, dtype: torch.dtype,
                 what: str = "MLP intermediate size") -> None:
        super().__init__()
        # gate and up in one matmul (checkpoint gate_proj/up_proj are its row blocks).
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [(intermediate, what, 1), (intermediate, what, 1)],
                                                       tp, dtype)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp, dtype, what)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up), reduce=reduce)


class MoE(nn.Module):
    """Mixtral sparse MoE: router linear -> softmax over experts (float32) -> top-k ->
    top-k weights renormalised to sum 1 -> weighted sum of the chosen experts' SwiGLU
    outputs. Each expert runs only on the tokens routed to it (index_select / index_add);
    the TP all-reduce happens once, after all experts."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype, with_experts: bool = True) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = cfg.num_local_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False, dtype=dtype)
        self.gate.weight.requires_grad_(False)
        # Without experts (attention/expert disaggregation, engine.afd): router only.
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.intermediate_size, tp, dtype, "expert intermediate size")
                                     for _ in range(cfg.num_local_experts if with_experts else 0))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [T, k] summing to 1, expert ids [T, k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = order // self.top_k  # token of each (token, choice), grouped by expert
        w = weights.reshape(-1).index_select(0, order)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = tokens[start:start + n]
            y = self.experts[e](x.index_select(0, tok), reduce=False)
            out.index_add_(0, tok, (y * w[start:start + n, None]).to(x.dtype))
            start += n
        return self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype, with_experts: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, tp, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp: MLP | MoE = (MoE(cfg, tp, dtype, with_experts) if cfg.is_moe
                               else MLP(cfg.hidden_size, cfg.intermediate_size, tp, dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        # Residual adds in place into the sublayer's fresh output (a + b == b + a exactly).
        x = self.self_attn(self.input_layernorm(x), cos, sin, meta, cache).add_(x)
        return self.mlp(self.post_attention_layernorm(x)).add_(x)


class CausalLM(nn.Module):
    """Decoder over a paged KV cache. Weights are uninitialised until engine.loader fills them.
    with_experts=False builds an MoE model without its experts (the attention side of
    engine.afd: embeddings, attention, norms, routers, lm_head)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Any = None, with_experts: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.tp = TPContext(tp_rank, tp_size, tp_group)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.with_experts = with_experts
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.tp, dtype, with_experts)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head_weight = (self.embed_tokens.weight if cfg.tie_word_embeddings
                               else _frozen(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.rotary = Rotary(cfg)
        self.lm_head_packed: PackedWeight | None = None

    def pack(self, free: bool = True) -> bool:
        """Pre-pack the lm_head for oneDNN (engine.linear.pack_model); its plain weight
        stays (tied: it is the embedding table)."""
        self.lm_head_packed = PackedWeight(self.lm_head_weight)
        return True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor],
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions: LongTensor [T] -> final-normed hidden states [T, hidden].
        layer_hook(i) runs after layer i has written its KV (layer-wise KV streaming)."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"{len(kv_caches)} KV caches for {len(self.layers)} layers")
        x = self.embed_tokens(input_ids)
        if self.rotary.inv_freq.device != x.device:
            self.rotary.to(x.device)
        cos, sin = self.rotary.tables(positions, x.dtype)
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, cos, sin, meta, cache)
            if layer_hook is not None:
                layer_hook(i)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab] (lm_head is replicated)."""
        return linear(hidden, self.lm_head_weight, self.lm_head_packed).float()


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      tp_size: int = 1, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Zeroed caches, one [2, num_blocks, block_size, kv_heads/tp, head_dim] per layer."""
    kvh = TPContext(0, tp_size).split(cfg.num_key_value_heads, "key-value heads")[1]
    return [torch.zeros(2, num_blocks, block_size, kvh, cfg.head_dim, dtype=dtype, device=device)
            for _ in range(cfg.num_hidden_layers)]
