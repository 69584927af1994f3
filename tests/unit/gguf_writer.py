"""Write a make-model directory as a GGUF the way llama.cpp's converter lays it out (q/k
rows permuted for its RoPE, experts stacked, the byte-level BPE tokenizer as
tokenizer.ggml.* keys), so that the GGUF import can be checked by a round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path, arch: str = "llama", pre: str = "gpt2",
               chat_template: str | None = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}") -> Path:
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    sd = load_file(str(model_dir / "model.safetensors"))
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kvh)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("num_local_experts"):
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def put(name: str, arr: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr.astype(np.float32)))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd:
        put("output.weight", sd["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        h, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", sd[h + "input_layernorm.weight"])
        put(b + "ffn_norm.weight", sd[h + "post_attention_layernorm.weight"])
        put(b + "attn_q.weight", llama_cpp_permute(sd[h + "self_attn.q_proj.weight"], heads))
        put(b + "attn_k.weight", llama_cpp_permute(sd[h + "self_attn.k_proj.weight"], kvh))
        put(b + "attn_v.weight", sd[h + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", sd[h + "self_attn.o_proj.weight"])
        if cfg.get("num_local_experts"):
            put(b + "ffn_gate_inp.weight", sd[h + "block_sparse_moe.gate.weight"])
            for gg, hf in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                put(f"{b}ffn_{gg}_exps.weight", np.stack(
                    [sd[f"{h}block_sparse_moe.experts.{j}.{hf}.weight"] for j in range(cfg["num_local_experts"])]))
        else:
            put(b + "ffn_gate.weight", sd[h + "mlp.gate_proj.weight"])
            put(b + "ffn_up.weight", sd[h + "mlp.up_proj.weight"])
            put(b + "ffn_down.weight", sd[h + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
