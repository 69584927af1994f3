"""`splitserve make-model`: a tiny HF-format model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json) that
both our engine and transformers load.

- The tokenizer is a byte-level BPE (vocab 1024) trained here, deterministically, on the
  Python standard library's source, which ships with every machine.
- Random weights (seeded) are scaled so that logits are spread out: greedy argmax
  margins sit far above fp32 rounding noise, so exactness tests can compare greedy
  tokens with transformers token for token.
- ``train=True`` trains the model for a fixed number of AdamW steps on the same text (a
  held-out split measures it) and caches the result under
  ``~/.cache/splitserve/models/<arch>-trained-<hash>/``; later calls copy the cache.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.paths import cache_root, corpus_files

logger = logging.getLogger(__name__)

SIZES: dict[str, dict[str, int]] = {
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
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]  # ids 0..5
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Bump when the output of make_model changes, so trained caches are rebuilt.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class TrainSettings:
    """Defaults take about 2 (llama) and 3 (mixtral) minutes on one core."""
    steps: int = 600
    batch: int = 8  # sequences per step
    seq: int = 256  # tokens per sequence
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    log_every: int = 50


# Training runs on one thread: the model is tiny, and OpenMP threads spinning on a busy
# 2-core machine made steps 25x slower than one thread. Not part of the cache key.
TRAIN_THREADS = 1


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """tokenizer.json text of the BPE trained on 2 MB of stdlib source (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train([str(p) for p in corpus_files(2 << 20)], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return str(tk.to_str(pretty=True))


def write_tokenizer(out_dir: Path) -> None:
    (out_dir / "tokenizer.json").write_text(_tokenizer_json())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": 8192}, indent=2))


def config_for(arch: str, vocab: int = VOCAB, size: str = "tiny") -> dict[str, object]:
    """An HF config.json for arch ("llama" or "mixtral") at size "tiny" or "small"."""
    if arch not in SIZES:
        raise ValueError(f"unknown arch {arch!r}; allowed: {sorted(SIZES)}")
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


def random_weights(cfg: dict[str, object], seed: int, lm_head_gain: float = 4.0,
                   qk_gain: float = 2.0) -> dict[str, torch.Tensor]:
    """Seeded weights under HF hub key names. Linear layers are N(0, gain^2 / fan_in):
    the lm_head gain spreads logits (std ~4 at gain 4), the q/k gain sharpens attention so
    that positions matter; norms are 1 + N(0, 0.1^2) so that they are not inert."""
    g = torch.Generator().manual_seed(seed)
    ints = {k: int(v) for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool)}
    h, inter, vocab = ints["hidden_size"], ints["intermediate_size"], ints["vocab_size"]
    heads, kvh, hd = ints["num_attention_heads"], ints["num_key_value_heads"], ints["head_dim"]

    def w(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) * (gain / inp ** 0.5)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g), "model.norm.weight": norm(h),
          "lm_head.weight": w(vocab, h, lm_head_gain)}
    for i in range(ints["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = w(heads * hd, h, qk_gain)
        sd[p + "self_attn.k_proj.weight"] = w(kvh * hd, h, qk_gain)
        sd[p + "self_attn.v_proj.weight"] = w(kvh * hd, h)
        sd[p + "self_attn.o_proj.weight"] = w(h, heads * hd)
        if "num_local_experts" in ints:
            sd[p + "block_sparse_moe.gate.weight"] = w(ints["num_local_experts"], h, 2.0)
            for j in range(ints["num_local_experts"]):
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


def train_weights(model_dir: Path, settings: TrainSettings, seed: int) -> dict[str, float]:
    """Train the model in model_dir in place: causal-LM loss, AdamW with linear warm-up
    and cosine decay, a fixed number of steps (deterministic for a seed and thread count).
    Held-out loss (last 5% of the text) before and after goes to train_log.json."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _train(model_dir, settings, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model_dir: Path, settings: TrainSettings, seed: int) -> dict[str, float]:
    from safetensors.torch import load_file

    from models.train import corpus_tokens, dense_forward, heldout_loss
    from engine.config import ModelConfig
    from engine.rope import Rotary
    from engine.tokenizer import Tokenizer

    torch.manual_seed(seed)
    cfg = ModelConfig.from_dir(model_dir)
    rotary = Rotary(cfg)
    sd = {k: v.float().requires_grad_(True) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    train_data, held = corpus_tokens(Tokenizer.from_dir(model_dir))
    before = heldout_loss(sd, cfg, held, rotary, settings.seq)
    logger.info("training %s: %d train / %d held-out tokens, held-out loss %.3f at init",
                model_dir.name, len(train_data), len(held), before)
    opt = torch.optim.AdamW(sd.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    t0, loss_v = time.monotonic(), float("nan")
    for step in range(settings.steps):
        warm = min(1.0, (step + 1) / settings.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = settings.lr * warm * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        starts = torch.randint(0, len(train_data) - settings.seq - 1, (settings.batch,), generator=gen).tolist()
        x = torch.stack([train_data[s:s + settings.seq] for s in starts])
        y = torch.stack([train_data[s + 1:s + settings.seq + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(dense_forward(sd, cfg, x, rotary).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(sd.values()), 1.0)
        opt.step()
        loss_v = loss.item()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            logger.info("step %d/%d train loss %.3f (%.0fs)", step, settings.steps, loss_v, time.monotonic() - t0)
    after = heldout_loss(sd, cfg, held, rotary, settings.seq)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})
    log = {**asdict(settings), "seed": seed, "seconds": round(time.monotonic() - t0, 1), "train_loss": loss_v,
           "heldout_loss_before": before, "heldout_loss_after": after, "heldout_ppl_after": math.exp(after)}
    (model_dir / "train_log.json").write_text(json.dumps(log, indent=2))
    logger.info("trained %s: held-out loss %.3f -> %.3f", model_dir.name, before, after)
    return log


def _cache_root() -> Path:
    return cache_root() / "models"


def trained_model_dir(arch: str, seed: int = 0, settings: TrainSettings = TrainSettings()) -> Path:
    """The cached trained model for these settings, trained first if absent."""
    key = json.dumps({"arch": arch, "seed": seed, "train": asdict(settings), "format": FORMAT_VERSION,
                      "python": sys.version_info[:2]}, sort_keys=True)
    root = _cache_root()
    cached = root / f"{arch}-trained-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (cached / "model.safetensors").is_file():
        return cached
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{cached.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes may ask at once: one trains
        if not (cached / "model.safetensors").is_file():
            tmp = root / f".{cached.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _write_random(arch, tmp, seed, "tiny", lm_head_gain=1.0, qk_gain=1.0)
            train_weights(tmp, settings, seed)
            (tmp / "settings.json").write_text(key)
            tmp.rename(cached)
    return cached


def _write_random(arch: str, out: Path, seed: int, size: str, **gains: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    cfg = config_for(arch, VOCAB, size)
    write_model(out, cfg, random_weights(cfg, seed, **gains))


def make_model(arch: str, out_dir: str | Path, train: bool = False, seed: int = 0, size: str = "tiny",
               train_settings: TrainSettings | None = None) -> Path:
    """Write a model directory at out_dir and return its path. arch: "llama" or
    "mixtral"; train: trained on stdlib text (cached) instead of random; size: "tiny"
    (the test model) or "small" (random only, for overhead measurements)."""
    if arch not in SIZES:
        raise ValueError(f"unknown arch {arch!r}; allowed: {sorted(SIZES)}")
    out = Path(out_dir)
    if train:
        if size != "tiny":
            raise ValueError("train=True builds the tiny size only")
        shutil.copytree(trained_model_dir(arch, seed, train_settings or TrainSettings()), out, dirs_exist_ok=True)
        return out
    _write_random(arch, out, seed, size)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make-model", description="write a tiny HF-format model")
    ap.add_argument("--arch", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train", action="store_true", help="train on stdlib source (cached) instead of random")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.monotonic()
    out = make_model(a.arch, a.out, a.train, a.seed)
    logger.info("wrote %s model to %s in %.1fs", a.arch, out, time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
