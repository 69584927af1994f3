"""Hardware and model catalogue: GPU types (YAML) and model shapes (from config.json)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

_DIR = Path(__file__).parent / "catalogue"


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float
    mem_bw_gbps: float
    mem_gib: float
    intra_node_gbps: float
    cross_node_gbps: float
    gpus_per_node: int
    # Achieved fractions of peak FLOPs and HBM bandwidth for the roofline, and the latency
    # of one small all-reduce on the intra-node link; None: placement.latency's defaults.
    mfu: float | None = None
    mbu: float | None = None
    allreduce_latency_us: float | None = None


@cache
def gpus() -> dict[str, GPU]:
    data = yaml.safe_load((_DIR / "gpus.yaml").read_text())
    return {name: GPU(name=name, **spec) for name, spec in data.items()}


def gpu(name: str) -> GPU:
    table = gpus()
    if name not in table:
        raise ValueError(f"unknown GPU type {name!r}; known: {sorted(table)}")
    return table[name]


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int = 0
    top_k: int = 0
    bytes_per_param: int = 2

    @property
    def attn_params_per_layer(self) -> int:
        q = self.hidden * self.num_heads * self.head_dim
        kv = 2 * self.hidden * self.num_kv_heads * self.head_dim
        return q + kv + self.num_heads * self.head_dim * self.hidden

    @property
    def ffn_params_per_expert(self) -> int:
        # SwiGLU (gate, up, down); OPT-style 2-matrix FFNs are given as intermediate*2/3.
        return 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        experts = max(1, self.num_experts)
        per_layer = self.attn_params_per_layer + experts * self.ffn_params_per_expert
        return self.num_layers * per_layer + 2 * self.vocab * self.hidden

    @property
    def active_params(self) -> int:
        """Parameters touched per token (MoE: top_k experts)."""
        k = self.top_k if self.num_experts else 1
        per_layer = self.attn_params_per_layer + k * self.ffn_params_per_expert
        return self.num_layers * per_layer + 2 * self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_param

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str = "model", bytes_per_param: int = 2) -> "ModelShape":
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return cls(name=name, num_layers=cfg["num_hidden_layers"], hidden=hidden,
                   intermediate=cfg.get("intermediate_size") or cfg.get("ffn_dim", 4 * hidden),
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or hidden // heads, vocab=cfg["vocab_size"],
                   num_experts=cfg.get("num_local_experts", 0) or 0,
                   top_k=cfg.get("num_experts_per_tok", 0) or 0, bytes_per_param=bytes_per_param)

    @classmethod
    def from_dir(cls, path: str | Path, bytes_per_param: int = 2) -> "ModelShape":
        import json

        p = Path(path)
        return cls.from_config(json.loads((p / "config.json").read_text()), p.name, bytes_per_param)


def opt(size: str) -> ModelShape:
    """OPT shapes used by DistServe's evaluation (Zhang et al. 2022, table 1). OPT's FFN is
    two matrices of hidden x 4*hidden; expressed as a SwiGLU-equivalent intermediate."""
    table = {"13b": (40, 5120, 40), "66b": (64, 9216, 72), "175b": (96, 12288, 96)}
    layers, hidden, heads = table[size]
    return ModelShape(f"opt-{size}", layers, hidden, intermediate=(8 * hidden) // 3, num_heads=heads,
                      num_kv_heads=heads, head_dim=hidden // heads, vocab=50272)
