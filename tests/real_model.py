"""The real built-in model (SmolLM2-135M-Instruct) as tests check it: conversations and
transformers' greedy answers to them, computed once per process."""

from __future__ import annotations

import functools

# Conversations the real model is checked on: no system prompt (the template adds its
# default one), a system prompt, and several turns.
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant. Answer in one short sentence."},
     {"role": "user", "content": "Name a primary color."}],
    [{"role": "user", "content": "Hi, my name is Ana."},
     {"role": "assistant", "content": "Hello Ana! How can I help you today?"},
     {"role": "user", "content": "What is my name?"}],
]
CHAT_MAX_NEW = 40


@functools.lru_cache(maxsize=None)
def hf_chat_greedy(model_dir: str, conversation: int, max_new: int = CHAT_MAX_NEW) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy output ids) of transformers on CONVERSATIONS[conversation], fp32,
    stopping at the model's end of turn (the eos token is kept, as generate returns it)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = _hf_model(model_dir)
    ids = tok.apply_chat_template(CONVERSATIONS[conversation], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return list(ids), out[0, len(ids):].tolist()


@functools.lru_cache(maxsize=2)
def _hf_model(model_dir: str):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
