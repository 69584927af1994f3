"""Llama-family decoder and Mixtral-style MoE in plain PyTorch, over a paged KV cache,
tensor-parallel through engine.tp."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import paged_attention, write_kv
from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.rope import Rotary, apply_rotary
from engine.tp import ColumnParallelLinear, RowParallelLinear, TPContext


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        hd = cfg.head_dim
        tp.shard(cfg.num_attention_heads, "attention heads")
        tp.shard(cfg.num_key_value_heads, "KV heads")
        self.heads = cfg.num_attention_heads // tp.size
        self.kv_heads = cfg.num_key_value_heads // tp.size
        self.head_dim = hd
        self.scale = hd ** -0.5
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_attention_heads * hd, tp, dtype, "attention heads x head_dim")
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_key_value_heads * hd, tp, dtype, "KV heads x head_dim")
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_key_value_heads * hd, tp, dtype, "KV heads x head_dim")
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, tp, dtype, "attention heads x head_dim")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        write_kv(cache, k, v, meta.slot_mapping)
        o = paged_attention(q, cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), intermediate dimension split across ranks."""

    def __init__(self, hidden: int, intermediate: int, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, tp, dtype, "MLP intermediate size")
        self.up_proj = ColumnParallelLinear(hidden, intermediate, tp, dtype, "MLP intermediate size")
        self.down_proj = RowParallelLinear(intermediate, hidden, tp, dtype, "MLP intermediate size")

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x), reduce=reduce)


class MoE(nn.Module):
    """Mixtral sparse MoE: softmax router, top-k, top-k weights renormalised to sum 1."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False, dtype=dtype)
        self.gate.weight.requires_grad_(False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.intermediate_size, tp, dtype)
                                     for _ in range(cfg.num_local_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():
            tok, slot = torch.nonzero(experts == e, as_tuple=True)
            y = self.experts[e](x[tok], reduce=False) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, tp, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp: nn.Module = (MoE(cfg, tp, dtype) if cfg.is_moe
                               else MLP(cfg.hidden_size, cfg.intermediate_size, tp, dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: object = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.tp = TPContext(tp_rank, tp_size, tp_group)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.tp, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype),
                                               requires_grad=False)
        self.rotary = Rotary(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, meta, cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight).float()


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      tp_size: int = 1) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, kv_heads/tp, head_dim] tensor per layer."""
    kvh = cfg.num_key_value_heads // tp_size
    return [torch.zeros(2, num_blocks, block_size, kvh, cfg.head_dim, dtype=dtype)
            for _ in range(cfg.num_hidden_layers)]
