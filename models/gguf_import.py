"""Llama-family GGUF file -> HF-format model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json) that
our engine and transformers both load.

What a GGUF holds and how it maps back (llama.cpp's converter, convert_hf_to_gguf.py,
is the reference for the forward direction):
- tensors ``token_embd``, ``output_norm``, ``output`` (absent when the embeddings are
  tied), ``blk.{i}.attn_{norm,q,k,v,output}``, ``blk.{i}.ffn_{norm,gate,up,down}``, and for
  MoE ``blk.{i}.ffn_gate_inp`` plus the experts stacked in ``ffn_{gate,up,down}_exps``;
  quantized ones (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized with the ``gguf``
  package to fp32.
- llama.cpp permutes the rows of q and k so that its RoPE rotates adjacent pairs
  (``reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)``); HF Llama rotates halves, so
  the import applies the inverse permutation.
- the tokenizer as ``tokenizer.ggml.*``: model ``gpt2`` (byte-level BPE: tokens, merges,
  token types) with a pre-tokenizer name (``tokenizer.ggml.pre``) that stands for a split
  regex; special tokens are those of type CONTROL (3). SentencePiece (``llama``)
  tokenizers are not converted yet and are refused with a clear error.

Anything the engine cannot run (another architecture, a tensor type the gguf package
cannot dequantize, a truncated file) raises ModelLoadError naming the file and reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama",)
# tokenizer.ggml.pre -> extra pre-tokenization ahead of the byte-level GPT-2 split.
# smollm (and starcoder, refact, ...) isolate every digit: llama.cpp's regex "\p{N}" before
# the GPT-2 regex (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM), which is what the
# tokenizers package's Digits(individual_digits=True) does.
_DIGIT_PRES = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_PRES = ("default", "gpt2", "gpt-2")
_LLAMA3_PRES = ("llama-bpe", "llama3")
SUPPORTED_PRES = _GPT2_PRES + _DIGIT_PRES + _LLAMA3_PRES
# The Llama 3 split (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL = 3  # llama.cpp token type of special tokens


class GGUFFile:
    """Metadata and tensors of one GGUF file, read lazily (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such file")
        try:
            import gguf
        except ImportError:
            raise ModelLoadError(f"{self.path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/IndexError/struct.error on bad bytes
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                                 "truncated or corrupted?") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def need(self, key: str) -> Any:
        v = self.field(key)
        if v is None:
            raise ModelLoadError(f"{self.path}: metadata key {key!r} is missing")
        return v

    def tensor(self, name: str) -> np.ndarray:
        """fp32 array of tensor `name` in PyTorch's (row-major, out x in) shape."""
        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: tensor {name!r} is missing")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        try:
            arr = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, which the gguf "
                                 "package cannot dequantize") from None
        arr = np.asarray(arr, dtype=np.float32)
        if arr.size != int(np.prod(shape)):
            raise ModelLoadError(f"{self.path}: tensor {name} holds {arr.size} values, its shape {shape} needs "
                                 f"{int(np.prod(shape))}; truncated file?")
        return arr.reshape(shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation for `heads` heads."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fp32_round(x: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores epsilons as float32)."""
    return float(str(np.float32(x)))


def config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    arch = g.need("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"{g.path}: architecture {arch!r} is not supported; allowed: {list(SUPPORTED_ARCHS)}")
    p = f"{arch}."
    heads = int(g.need(p + "attention.head_count"))
    hidden = int(g.need(p + "embedding_length"))
    head_dim = int(g.field(p + "attention.key_length", g.field(p + "rope.dimension_count", hidden // heads)))
    tokens = g.need("tokenizer.ggml.tokens")
    experts = int(g.field(p + "expert_count", 0) or 0)
    tied = "output.weight" not in g.tensors
    cfg: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if experts else "llama",
        "vocab_size": int(g.field(p + "vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(g.need(p + "feed_forward_length")),
        "num_hidden_layers": int(g.need(p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.field(p + "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(g.field(p + "context_length", 2048)),
        "rms_norm_eps": _fp32_round(float(g.field(p + "attention.layer_norm_rms_epsilon", 1e-5))),
        "rope_theta": float(g.field(p + "rope.freq_base", 10000.0)),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tied, "torch_dtype": "float32", "use_cache": True,
        "bos_token_id": g.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": g.field("tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
    }
    cfg["rope_parameters"] = {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    scaling = g.field(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelLoadError(f"{g.path}: rope scaling {scaling!r} is not supported by the GGUF import; "
                             "allowed: none")
    if experts:
        cfg["num_local_experts"] = experts
        cfg["num_experts_per_tok"] = int(g.need(p + "expert_used_count"))
    return cfg


def weights_from_gguf(g: GGUFFile, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors (q and k un-permuted to HF's rotate-half layout)."""
    heads, kv_heads = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(g.tensor(name), copy=True))

    sd = {"model.embed_tokens.weight": t("token_embd.weight"), "model.norm.weight": t("output_norm.weight")}
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = t("output.weight")
    for i in range(int(cfg["num_hidden_layers"])):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = t(b + "attn_norm.weight")
        sd[h + "post_attention_layernorm.weight"] = t(b + "ffn_norm.weight")
        sd[h + "self_attn.q_proj.weight"] = torch.from_numpy(_unpermute(g.tensor(b + "attn_q.weight"), heads).copy())
        sd[h + "self_attn.k_proj.weight"] = torch.from_numpy(
            _unpermute(g.tensor(b + "attn_k.weight"), kv_heads).copy())
        sd[h + "self_attn.v_proj.weight"] = t(b + "attn_v.weight")
        sd[h + "self_attn.o_proj.weight"] = t(b + "attn_output.weight")
        if cfg.get("num_local_experts"):
            sd[h + "block_sparse_moe.gate.weight"] = t(b + "ffn_gate_inp.weight")
            stacks = {hf: g.tensor(f"{b}ffn_{gg}_exps.weight") for gg, hf in (("gate", "w1"), ("up", "w3"),
                                                                              ("down", "w2"))}
            for j in range(int(cfg["num_local_experts"])):
                for hf, arr in stacks.items():
                    sd[f"{h}block_sparse_moe.experts.{j}.{hf}.weight"] = torch.from_numpy(arr[j].copy())
        else:
            sd[h + "mlp.gate_proj.weight"] = t(b + "ffn_gate.weight")
            sd[h + "mlp.up_proj.weight"] = t(b + "ffn_up.weight")
            sd[h + "mlp.down_proj.weight"] = t(b + "ffn_down.weight")
    return sd


def tokenizer_from_gguf(g: GGUFFile) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) from the tokenizer.ggml.* keys."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = g.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"{g.path}: tokenizer model {kind!r} is not supported by the GGUF import; "
                             "allowed: 'gpt2' (byte-level BPE)")
    pre = g.field("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRES:
        raise ModelLoadError(f"{g.path}: pre-tokenizer {pre!r} is not supported; allowed: {list(SUPPORTED_PRES)}")
    tokens = list(g.need("tokenizer.ggml.tokens"))
    types = list(g.field("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in g.need("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelLoadError(f"{g.path}: tokenizer.ggml.tokens has duplicate entries")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=pre not in _LLAMA3_PRES)
    if pre in _DIGIT_PRES:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split])
    elif pre in _LLAMA3_PRES:
        from tokenizers import Regex

        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False), split])
    else:
        tk.pre_tokenizer = split
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty == _CONTROL])

    def text(key: str) -> str | None:
        i = g.field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk, pad = (text(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding"))
    add_bos = bool(g.field("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        bos_id = int(g.need("tokenizer.ggml.bos_token_id"))
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)])])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tcfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                            "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                            "model_max_length": int(g.field(f"{g.need('general.architecture')}.context_length", 2048))}
    for name, value in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if value is not None:
            tcfg[name] = value
    return str(tk.to_str(pretty=True)), tcfg


def convert_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF-format directory for the GGUF at `path` into `out_dir` (created; files
    are written to a temporary sibling and moved in place at the end)."""
    t0 = time.monotonic()
    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    tok_json, tcfg = tokenizer_from_gguf(g)
    sd = weights_from_gguf(g, cfg)
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (tmp / "tokenizer.json").write_text(tok_json)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    template = g.field("tokenizer.chat_template")
    if isinstance(template, str):
        (tmp / "chat_template.jinja").write_text(template)  # where transformers 5 saves it
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "source": Path(path).name})
    (tmp / "source.json").write_text(json.dumps({"gguf": str(Path(path).resolve()), "name": g.field("general.name"),
                                                 "file_type": g.field("general.file_type")}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("converted %s -> %s in %.1fs", path, out, time.monotonic() - t0)
    return out
