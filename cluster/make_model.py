"""`splitserve make-model`: a tiny HF-format model (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) that transformers also
loads. Weights are random (seeded) with scales chosen so greedy decoding has clear
margins; ``--train`` trains it for a few minutes on the Python standard library's source
(text that ships with every machine) and caches the result."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sysconfig
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SIZES = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "mixtral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
}
# A larger shape for overhead and goodput measurements, where a decode step takes
# milliseconds rather than a fraction of one.
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32)
VOCAB = 1024
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def corpus_files(limit_bytes: int = 4 << 20) -> list[Path]:
    """Deterministic slice of the standard library's source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(root.glob("*.py")):
        size = p.stat().st_size
        if total + size > limit_bytes:
            break
        out.append(p)
        total += size
    return out


def train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train([str(p) for p in corpus_files(2 << 20)], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tk.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 8192}, indent=2))


def config_for(arch: str, vocab: int, size: str = "tiny") -> dict[str, object]:
    cfg: dict[str, object] = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "MixtralForCausalLM"],
        "model_type": arch, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
        "head_dim": 16, "initializer_range": 0.02, "use_cache": True, **SIZES[arch],
    }
    if size == "small":
        cfg.update(SMALL)
    elif size != "tiny":
        raise ValueError(f"unknown size {size!r}; allowed: tiny, small")
    return cfg


def random_weights(cfg: dict[str, object], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])  # type: ignore[call-overload]
    heads, kvh, hd = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"]), int(cfg["head_dim"])  # type: ignore[call-overload]

    def w(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) * (gain / inp ** 0.5)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": torch.randn(int(cfg["vocab_size"]), h, generator=g),  # type: ignore[call-overload]
          "model.norm.weight": norm(h),
          # A large output gain spreads the logits: greedy margins far above fp32 noise.
          "lm_head.weight": w(int(cfg["vocab_size"]), h, 4.0)}  # type: ignore[call-overload]
    for i in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = w(heads * hd, h, 2.0)
        sd[p + "self_attn.k_proj.weight"] = w(kvh * hd, h, 2.0)
        sd[p + "self_attn.v_proj.weight"] = w(kvh * hd, h)
        sd[p + "self_attn.o_proj.weight"] = w(h, heads * hd)
        if "num_local_experts" in cfg:
            sd[p + "block_sparse_moe.gate.weight"] = w(int(cfg["num_local_experts"]), h, 2.0)  # type: ignore[call-overload]
            for j in range(int(cfg["num_local_experts"])):  # type: ignore[call-overload]
                e = f"{p}block_sparse_moe.experts.{j}."
                sd[e + "w1.weight"], sd[e + "w3.weight"], sd[e + "w2.weight"] = w(inter, h), w(inter, h), w(h, inter)
        else:
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = w(inter, h), w(inter, h)
            sd[p + "mlp.down_proj.weight"] = w(h, inter)
    return {k: v.contiguous() for k, v in sd.items()}


def write_model(out: Path, cfg: dict[str, object], sd: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2))
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def make_model(arch: str, out_dir: str | Path, train: bool = False, seed: int = 0,
               train_seconds: float = 180.0, size: str = "tiny") -> Path:
    if arch not in SIZES:
        raise ValueError(f"unknown arch {arch!r}; allowed: {sorted(SIZES)}")
    out = Path(out_dir)
    if train:
        from cluster.builtin_models import cache_root

        key = hashlib.sha1(f"{arch}-{seed}-{train_seconds}-v1".encode()).hexdigest()[:12]
        cached = cache_root() / "models" / f"{arch}-trained-{key}"
        if not (cached / "model.safetensors").is_file():
            tmp = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            make_model(arch, tmp, seed=seed)
            from cluster.train_model import train

            train(tmp, seconds=train_seconds, seed=seed)
            tmp.rename(cached)
        shutil.copytree(cached, out, dirs_exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out)
    cfg = config_for(arch, VOCAB, size)
    write_model(out, cfg, random_weights(cfg, seed))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make-model")
    ap.add_argument("--arch", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.time()
    make_model(a.arch, a.out, a.train, a.seed)
    print(f"wrote {a.arch} model to {a.out} in {time.time() - t0:.1f}s")
    return 0
