"""Load an HF-format model directory: config.json, model.safetensors (or a sharded
model.safetensors.index.json) into CausalLM, each tensor-parallel rank taking its slice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model import CausalLM, MoE
from engine.tokenizer import Tokenizer


def _shards(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no 'weight_map' object")
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def _targets(model: CausalLM) -> dict[str, Callable[[torch.Tensor], None]]:
    """HF tensor name -> how to load it into this rank's module."""
    def param(p: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
        def load(t: torch.Tensor) -> None:
            if t.shape != p.shape:
                raise ModelLoadError(f"shape {tuple(t.shape)} where the model expects {tuple(p.shape)}")
            p.data.copy_(t)
        return load

    out: dict[str, Callable[[torch.Tensor], None]] = {"model.embed_tokens.weight": param(model.embed_tokens.weight),
                                                      "model.norm.weight": param(model.norm.weight)}
    if not model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = param(model.lm_head_weight)
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = param(layer.input_layernorm.weight)
        out[pre + "post_attention_layernorm.weight"] = param(layer.post_attention_layernorm.weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{pre}self_attn.{name}.weight"] = getattr(layer.self_attn, name).load
        if isinstance(layer.mlp, MoE):
            out[pre + "block_sparse_moe.gate.weight"] = param(layer.mlp.gate.weight)
            for j, e in enumerate(layer.mlp.experts):
                ep = f"{pre}block_sparse_moe.experts.{j}."
                out[ep + "w1.weight"] = e.gate_proj.load
                out[ep + "w3.weight"] = e.up_proj.load
                out[ep + "w2.weight"] = e.down_proj.load
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{pre}mlp.{name}.weight"] = getattr(layer.mlp, name).load
    return out


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, tp_rank: int = 0, tp_size: int = 1,
               tp_group: object = None, device: str = "cpu") -> CausalLM:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    model = CausalLM(cfg, dtype, tp_rank, tp_size, tp_group)
    targets = _targets(model)
    files = _shards(model_dir)
    missing = sorted(set(targets) - set(files))
    if missing:
        raise ModelLoadError(f"{model_dir}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    ignorable = {n for n in files if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    unexpected = sorted(set(files) - set(targets) - ignorable)
    if unexpected:
        raise ModelLoadError(f"{model_dir}: unexpected weights {unexpected[:5]} (architecture {cfg.arch})")
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, "pt") as f:
            for name in names:
                try:
                    targets[name](f.get_tensor(name).to(dtype))
                except ModelLoadError as e:
                    raise ModelLoadError(f"{path.name}: {name}: {e}") from None
    model.eval()
    return model.to(device)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)
