"""Load an HF-format model directory into CausalLM: config.json, then model.safetensors or
the shards named by model.safetensors.index.json. Each tensor-parallel rank reads only
its slice of every split tensor (safetensors slices, no full copy).

Checkpoint keys are the HF hub names (``model.layers.{i}.self_attn.q_proj.weight``, ...;
Mixtral experts ``block_sparse_moe.experts.{j}.w1/w2/w3.weight`` with w1 = gate,
w3 = up, w2 = down). A missing key, an unexpected key or a wrong shape raises
ModelLoadError naming the key.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model import MLP, CausalLM, DecoderLayer, MoE
from engine.tokenizer import Tokenizer
from engine.tp import Shard

logger = logging.getLogger(__name__)

# Keys some checkpoints carry that hold nothing we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{index}: not valid JSON: {e}") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
        files = {name: model_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise ModelLoadError(f"{index}: shard {f.name} is listed but missing from {model_dir}")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def _replicated(p: torch.Tensor) -> tuple[torch.Tensor, Shard]:
    return p, Shard(tuple(p.shape), None)


def _split(mod: Any) -> tuple[torch.Tensor, Shard]:
    return mod.weight, mod.shard


def _mlp(mlp: MLP, pre: str, names: tuple[str, str, str]) -> dict[str, tuple[torch.Tensor, Shard]]:
    gate, up, down = names
    return {f"{pre}{gate}.weight": mlp.gate_up_proj.part(0), f"{pre}{up}.weight": mlp.gate_up_proj.part(1),
            f"{pre}{down}.weight": _split(mlp.down_proj)}


def parameter_map(model: CausalLM) -> dict[str, tuple[torch.Tensor, Shard]]:
    """HF checkpoint key -> (this rank's parameter, which part of the full tensor it holds)."""
    out = {"model.embed_tokens.weight": _replicated(model.embed_tokens.weight),
           "model.norm.weight": _replicated(model.norm.weight)}
    if not model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = _replicated(model.lm_head_weight)
    for i, layer in enumerate(cast(list[DecoderLayer], list(model.layers))):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = _replicated(layer.input_layernorm.weight)
        out[pre + "post_attention_layernorm.weight"] = _replicated(layer.post_attention_layernorm.weight)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{pre}self_attn.{name}.weight"] = layer.self_attn.qkv_proj.part(j)
        out[f"{pre}self_attn.o_proj.weight"] = _split(layer.self_attn.o_proj)
        if isinstance(layer.mlp, MoE):
            out[pre + "block_sparse_moe.gate.weight"] = _replicated(layer.mlp.gate.weight)
            for j, expert in enumerate(layer.mlp.experts):
                out.update(_mlp(cast(MLP, expert), f"{pre}block_sparse_moe.experts.{j}.", ("w1", "w3", "w2")))
        else:
            out.update(_mlp(layer.mlp, pre + "mlp.", ("gate_proj", "up_proj", "down_proj")))
    return out


def _read(f: Any, name: str, shard: Shard) -> torch.Tensor:
    """This rank's part of tensor `name`, reading only that part from disk."""
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != shard.full_shape:
        raise ModelLoadError(f"{name}: shape {shape} in the checkpoint, the config implies {shard.full_shape}")
    if shard.dim is None:
        return f.get_tensor(name)  # type: ignore[no-any-return]
    end = shard.start + shard.length
    return sl[shard.start:end] if shard.dim == 0 else sl[:, shard.start:end]  # type: ignore[no-any-return]


def is_expert_key(name: str) -> bool:
    """A Mixtral expert weight (``...block_sparse_moe.experts.{j}.w1.weight``)."""
    return ".block_sparse_moe.experts." in name


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, tp_rank: int = 0, tp_size: int = 1,
               tp_group: Any = None, device: str | torch.device = "cpu", with_experts: bool = True) -> CausalLM:
    """This rank's CausalLM with weights from model_dir, cast to dtype, on device.
    with_experts=False: an MoE model without its experts (engine.afd's attention side);
    the checkpoint's expert tensors are then not read."""
    t0 = time.monotonic()
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    model = CausalLM(cfg, dtype, tp_rank, tp_size, tp_group, with_experts=with_experts)
    params = parameter_map(model)
    files = checkpoint_files(model_dir)
    missing = sorted(set(params) - set(files))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{model_dir}: checkpoint lacks {missing[:5]}{more} (architecture {cfg.arch})")
    ignorable = {n for n in files if n.endswith(_IGNORED_SUFFIXES) or (not with_experts and is_expert_key(n))}
    if cfg.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints still store it
    unexpected = sorted(set(files) - set(params) - ignorable)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ModelLoadError(f"{model_dir}: unexpected tensors {unexpected[:5]}{more} for architecture "
                             f"{cfg.arch} with {cfg.num_hidden_layers} layers")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for path, names in sorted(by_file.items()):
            with safe_open(path, "pt") as f:
                for name in names:
                    param, shard = params[name]
                    param.copy_(_read(f, name, shard).to(dtype))
    model.eval()
    model.to(device)
    logger.info("loaded %s (%s, %s, tp %d/%d) in %.2fs", model_dir, cfg.arch, dtype, tp_rank, tp_size,
                time.monotonic() - t0)
    return model


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def load_experts(model_dir: str | Path, dtype: torch.dtype, experts: list[list[int]],
                 device: str | torch.device = "cpu") -> list[dict[int, MLP]]:
    """The SwiGLU MLPs of the given experts of every layer (experts[layer] = expert ids),
    read from the model's safetensors (expert workers of engine.afd): only those tensors
    are read. Returns, per layer, expert id -> MLP (no tensor parallelism)."""
    from engine.tp import TPContext

    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    if not cfg.is_moe:
        raise ModelLoadError(f"{model_dir}: {cfg.hf_architecture} has no experts")
    if len(experts) != cfg.num_hidden_layers:
        raise ModelLoadError(f"expert lists for {len(experts)} layers; the model has {cfg.num_hidden_layers}")
    tp = TPContext(0, 1)
    out: list[dict[int, MLP]] = []
    params: dict[str, tuple[torch.Tensor, Shard]] = {}
    for i, ids in enumerate(experts):
        layer: dict[int, MLP] = {}
        for j in sorted(set(ids)):
            if not 0 <= j < cfg.num_local_experts:
                raise ModelLoadError(f"layer {i}: expert {j} out of range 0..{cfg.num_local_experts - 1}")
            mlp = MLP(cfg.hidden_size, cfg.intermediate_size, tp, dtype, "expert intermediate size")
            params.update(_mlp(mlp, f"model.layers.{i}.block_sparse_moe.experts.{j}.", ("w1", "w3", "w2")))
            layer[j] = mlp
        out.append(layer)
    files = checkpoint_files(model_dir)
    missing = sorted(set(params) - set(files))
    if missing:
        raise ModelLoadError(f"{model_dir}: checkpoint lacks {missing[:5]}")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for path, names in sorted(by_file.items()):
            with safe_open(path, "pt") as f:
                for name in names:
                    param, shard = params[name]
                    param.copy_(_read(f, name, shard).to(dtype))
    for layer in out:
        for mlp in layer.values():
            mlp.eval()
            mlp.to(device)
    return out
