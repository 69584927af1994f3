"""Model configuration read from an HF ``config.json`` (Llama family and Mixtral).

Both config generations are accepted: transformers v4 writes ``rope_theta`` and
``rope_scaling``; v5 writes ``rope_parameters: {"rope_theta": .., "rope_type": ..}``.
Fields a config may omit take the default of the matching transformers config class, so
that a model loads here exactly as it loads in transformers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

# HF architecture name -> our model family.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
}

# Defaults of transformers' config classes for the fields a config.json may leave out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                         "sliding_window": None},
    "MistralForCausalLM": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096 * 32,
                           "sliding_window": 4096},
    "MixtralForCausalLM": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32,
                           "sliding_window": None},
}

# RoPE scaling types and the keys each needs (besides rope_type and rope_theta).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16 (float32, float16, bfloat16)."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    key = aliases.get(name, name.removeprefix("torch."))
    if key not in _DTYPES:
        raise ModelLoadError(f"dtype {name!r} not supported; allowed: {sorted(_DTYPES)}")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    # Model family: "llama" (LlamaForCausalLM, MistralForCausalLM) or "mixtral".
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per expert for Mixtral
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Scaling parameters without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ..};
    # None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    # Keys older than this many positions are not attended to (Mistral); None: no window.
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=list)
    num_local_experts: int = 0  # 0 for dense models
    num_experts_per_tok: int = 0
    torch_dtype: str = "float32"  # the checkpoint's dtype name
    hf_architecture: str = "LlamaForCausalLM"

    @property
    def architecture(self) -> str:
        return self.arch

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype as a torch.dtype."""
        return parse_dtype(self.torch_dtype)

    def kv_bytes_per_token(self, dtype: torch.dtype | str = torch.bfloat16, tp_size: int = 1) -> int:
        """Bytes of K and V one token occupies over all layers (on one of tp_size ranks)."""
        elem = parse_dtype(dtype).itemsize
        return 2 * self.num_hidden_layers * (self.num_key_value_heads // tp_size) * self.head_dim * elem

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = d.get("architectures") or []
        hf_arch = next((a for a in archs if a in ARCHITECTURES), None)
        if hf_arch is None:
            raise ModelLoadError(f"{source}: field 'architectures' is {archs}; supported: {sorted(ARCHITECTURES)}")
        defaults = _HF_DEFAULTS[hf_arch]

        def need(key: str) -> Any:
            if d.get(key) is None:
                raise ModelLoadError(f"{source}: required field {key!r} is missing (architecture {hf_arch})")
            return d[key]

        _check_unsupported(d, source)
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        theta, scaling = _rope(d, source, float(defaults["rope_theta"]))
        max_pos = int(d.get("max_position_embeddings") or defaults["max_position_embeddings"])
        if scaling and scaling["rope_type"] == "llama3":
            scaling.setdefault("original_max_position_embeddings", max_pos)
        _check_rope_keys(scaling, source)
        eos = d.get("eos_token_id")
        window = d["sliding_window"] if "sliding_window" in d else defaults["sliding_window"]
        cfg = cls(
            arch=ARCHITECTURES[hf_arch], hf_architecture=hf_arch,
            vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")), num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps") or defaults["rms_norm_eps"]),
            rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos,
            sliding_window=None if window is None else int(window),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=_id_list(eos),
            num_local_experts=int(d.get("num_local_experts") or 0) if hf_arch == "MixtralForCausalLM" else 0,
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 0) if hf_arch == "MixtralForCausalLM" else 0,
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch."),
        )
        if cfg.arch == "mixtral":
            # transformers' MixtralConfig defaults: 8 experts, top-2.
            cfg.num_local_experts = cfg.num_local_experts or 8
            cfg.num_experts_per_tok = cfg.num_experts_per_tok or 2
            if cfg.num_experts_per_tok > cfg.num_local_experts:
                raise ModelLoadError(f"{source}: num_experts_per_tok {cfg.num_experts_per_tok} exceeds "
                                     f"num_local_experts {cfg.num_local_experts}")
        if heads % cfg.num_key_value_heads:
            raise ModelLoadError(f"{source}: num_attention_heads {heads} is not a multiple of "
                                 f"num_key_value_heads {cfg.num_key_value_heads}")
        if cfg.torch_dtype not in _DTYPES:
            raise ModelLoadError(f"{source}: dtype {cfg.torch_dtype!r} not supported; allowed: {sorted(_DTYPES)}")
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """config.json of an HF model directory; eos ids also from generation_config.json."""
        p = Path(path) / "config.json"
        cfg = cls.from_dict(_read_json(p, required=True), str(p))
        gen = _read_json(Path(path) / "generation_config.json", required=False)
        for e in _id_list(gen.get("eos_token_id")):
            if e not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(e)
        return cfg


def _read_json(p: Path, required: bool) -> dict[str, Any]:
    if not p.is_file():
        if required:
            raise ModelLoadError(f"no {p.name} in {p.parent} (expected an HF-format model directory)")
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{p}: expected a JSON object, found {type(data).__name__}")
    return data


def _id_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def _check_unsupported(d: dict[str, Any], source: str) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{source}: hidden_act {act!r} not supported; allowed: 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ModelLoadError(f"{source}: {key}=true not supported; allowed: false")
    prf = d.get("partial_rotary_factor", (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if float(prf) != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor {prf} not supported; allowed: 1.0")


def _rope(d: dict[str, Any], source: str, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either rope_parameters (v5) or
    rope_theta + rope_scaling (v4)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"{source}: rope_parameters must be an object, found {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(f"{source}: per-layer-type rope_parameters not supported; allowed: one global dict")
    rope = dict(params)
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta") or default_theta
    rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if rtype not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope type {rtype!r} not supported; allowed: {sorted(ROPE_TYPES)}")
    return float(theta), (None if rtype == "default" else {"rope_type": rtype, **rope})


def _check_rope_keys(scaling: dict[str, Any] | None, source: str) -> None:
    if not scaling:
        return
    missing = [k for k in ROPE_TYPES[scaling["rope_type"]] if scaling.get(k) is None]
    if missing:
        raise ModelLoadError(f"{source}: rope type {scaling['rope_type']!r} needs {missing} in rope_parameters")
