"""Model configuration read from an HF ``config.json`` (Llama family and Mixtral)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
}


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF rope_scaling / rope_parameters without rope_theta: {"rope_type": ..., ...} or None.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=list)
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    torch_dtype: str = "float32"

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(f"{source}: architectures {archs} not supported; allowed: "
                                 f"{sorted(ARCHITECTURES)}")

        def need(key: str) -> Any:
            if d.get(key) is None:
                raise ModelLoadError(f"{source}: required field {key!r} is missing")
            return d[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        # transformers v5 writes rope_parameters (with rope_theta inside); v4 rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "linear", "llama3"):
            raise ModelLoadError(f"{source}: rope type {rtype!r} not supported; allowed: default, linear, llama3")
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
        cfg = cls(
            arch=arch, vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")), num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=theta,
            rope_scaling=None if rtype == "default" else {**rope, "rope_type": rtype},
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
            num_local_experts=int(d.get("num_local_experts") or 0),
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        )
        if arch == "mixtral" and not (cfg.num_local_experts and cfg.num_experts_per_tok):
            raise ModelLoadError(f"{source}: Mixtral needs num_local_experts and num_experts_per_tok")
        if heads % cfg.num_key_value_heads:
            raise ModelLoadError(f"{source}: {heads} attention heads are not a multiple of "
                                 f"{cfg.num_key_value_heads} KV heads")
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelLoadError(f"no config.json in {Path(path)} (expected an HF-format model directory)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{p}: not valid JSON: {e}") from None
        cfg = cls.from_dict(data, str(p))
        gen = Path(path) / "generation_config.json"
        if gen.is_file():
            g = json.loads(gen.read_text())
            e = g.get("eos_token_id")
            if e is not None:
                extra = [e] if isinstance(e, int) else list(e)
                cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(extra))
        return cfg
