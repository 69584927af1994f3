"""ModelConfig reads both transformers v4 and v5 config forms with transformers' defaults,
refuses what the engine cannot run with a message naming the field, and RoPE (default,
linear, llama3) equals transformers' rotary embedding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.rope import Rotary

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
}
SCALINGS: list[dict[str, Any]] = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


def test_v4_and_v5_rope_forms_agree() -> None:
    for sc in SCALINGS[1:]:
        v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 5e5, **sc}})
        v4 = ModelConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {**sc, "type": sc["rope_type"]}})
        assert v5 == v4 and v5.rope_theta == 5e5 and v5.rope_scaling == sc
    plain = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4


def test_defaults_follow_transformers() -> None:
    cfg = ModelConfig.from_dict({**BASE, "head_dim": None, "eos_token_id": [2, 7]})
    assert (cfg.arch, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps) == ("llama", 4, 16, 1e-6)
    assert cfg.eos_token_ids == [2, 7] and cfg.rope_theta == 10000.0 and cfg.sliding_window is None
    mix = ModelConfig.from_dict({**BASE, "architectures": ["MixtralForCausalLM"]})
    assert (mix.arch, mix.num_local_experts, mix.num_experts_per_tok, mix.rope_theta) == ("mixtral", 8, 2, 1e6)
    assert mix.is_moe and not cfg.is_moe
    mistral = ModelConfig.from_dict({**BASE, "architectures": ["MistralForCausalLM"]})
    assert mistral.arch == "llama" and mistral.sliding_window == 4096
    assert ModelConfig.from_dict({**BASE, "dtype": "bfloat16"}).dtype == torch.bfloat16
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 2 * 2 * 4 * 16 * 2
    assert cfg.kv_bytes_per_token(torch.float32, tp_size=2) == 2 * 2 * 2 * 16 * 4


def test_from_dir_adds_generation_config_eos(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == [2, 9]


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures.*supported"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "needs.*low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
])
def test_unsupported_configs_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_dict({**BASE, **change}, "m/config.json")


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_rope_equals_transformers(scaling: dict[str, Any]) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = {"rope_theta": 5e5, **scaling}
    hf_cfg = LlamaConfig(**{k: v for k, v in BASE.items() if k != "architectures"}, rope_parameters=params)
    ours = ModelConfig.from_dict({**BASE, "rope_parameters": params})
    rotary = Rotary(ours)
    hf = LlamaRotaryEmbedding(hf_cfg)
    assert torch.equal(rotary.inv_freq, hf.inv_freq)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 3000])  # beyond 64 grows the cache
    x = torch.randn(len(positions), 4, 16, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rotary.cos_sin(positions, dtype)
        hcos, hsin = hf(x.to(dtype), positions[None])
        assert torch.equal(cos, hcos[0]) and torch.equal(sin, hsin[0])
    from engine.rope import apply_rotary

    cos, sin = rotary.cos_sin(positions, torch.float32)
    want, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(apply_rotary(x, cos, sin), want[0].transpose(0, 1))
