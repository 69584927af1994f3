"""Pieces for training a tiny make-model model on the Python standard library's source
(``models.make.train_weights`` runs the training loop: a fixed number of AdamW steps), so
that codec and speculative-decoding quality can be measured on a model that has learned
something: a dense (non-paged) forward over the same weights as the engine's, the corpus
split, and the held-out loss (last 5% of the text)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.rope import Rotary, apply_rotary
from engine.tokenizer import Tokenizer
from models.paths import corpus_files


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def dense_forward(sd: dict[str, torch.Tensor], cfg: ModelConfig, ids: torch.Tensor,
                  rotary: Rotary) -> torch.Tensor:
    """ids [B, L] -> logits [B, L, vocab], the same math as engine.model without paging."""
    b, n = ids.shape
    hd, h, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    x = sd["model.embed_tokens.weight"][ids]
    cos, sin = rotary.cos_sin(torch.arange(n), x.dtype)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = _rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps).reshape(b * n, -1)

        def rope(t: torch.Tensor, heads: int) -> torch.Tensor:
            t = t.view(b, n, heads, hd)
            return torch.stack([apply_rotary(t[j], cos, sin) for j in range(b)])

        q = rope(a @ sd[p + "self_attn.q_proj.weight"].T, h).transpose(1, 2)
        k = rope(a @ sd[p + "self_attn.k_proj.weight"].T, kvh).transpose(1, 2)
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(b, n, kvh, hd).transpose(1, 2)
        k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b * n, -1)
        x = x + (o @ sd[p + "self_attn.o_proj.weight"].T).view(b, n, -1)
        m = _rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps).reshape(b * n, -1)
        if cfg.is_moe:
            probs = F.softmax(m @ sd[p + "block_sparse_moe.gate.weight"].T, dim=-1)
            w, idx = probs.topk(cfg.num_experts_per_tok, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            gate = torch.zeros_like(probs).scatter(1, idx, w)
            y = torch.zeros_like(m)
            for e in range(cfg.num_local_experts):
                ep = f"{p}block_sparse_moe.experts.{e}."
                act = F.silu(m @ sd[ep + "w1.weight"].T) * (m @ sd[ep + "w3.weight"].T)
                y = y + gate[:, e:e + 1] * (act @ sd[ep + "w2.weight"].T)
        else:
            act = F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)
            y = act @ sd[p + "mlp.down_proj.weight"].T
        x = x + y.view(b, n, -1)
    x = _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return x @ sd["lm_head.weight"].T


def corpus_tokens(tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids: list[int] = []
    for path in corpus_files(4 << 20):
        ids += tok.encode(path.read_text(errors="replace"), add_special_tokens=False)
    data = torch.tensor(ids, dtype=torch.long)
    cut = int(len(data) * 0.95)
    return data[:cut], data[cut:]


@torch.no_grad()
def heldout_loss(sd: dict[str, torch.Tensor], cfg: ModelConfig, data: torch.Tensor, rotary: Rotary,
                 seq: int = 256, batches: int = 8) -> float:
    losses = []
    for i in range(batches):
        chunk = data[i * seq * 4:(i + 1) * seq * 4 + 1]
        if len(chunk) < 4 * seq + 1:
            break
        x, y = chunk[:-1].view(4, seq), chunk[1:].view(4, seq)
        losses.append(F.cross_entropy(dense_forward(sd, cfg, x, rotary).flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)
