"""Reference implementations for sampling tests: transformers' generate with its logits
processors (and OpenAI's frequency/presence definition written out, which transformers
lacks), and transformers' log-softmax."""

from __future__ import annotations

import torch

MAX_NEW = 12


class OpenAIPenalties:
    """OpenAI's definition: logit -= count * frequency_penalty + (count > 0) * presence_penalty,
    counts over the generated tokens only."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.n, self.f, self.p = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.n:]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - counts * self.f - (counts > 0).to(scores.dtype) * self.p


def hf_generate(hf, prompt, processors, max_new=MAX_NEW):
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                          logits_processor=LogitsProcessorList(processors), pad_token_id=0,
                          eos_token_id=None)
    return gen[0, len(prompt):].tolist()


def hf_processors(case: dict, prompt_len: int, eos: list[int]):
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        SequenceBiasLogitsProcessor)

    procs = []  # vLLM's order: bias, min_tokens, repetition, frequency/presence
    if case.get("logit_bias"):
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in case["logit_bias"].items()]))
    if case.get("min_tokens"):
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, case["min_tokens"], eos))
    if case.get("repetition_penalty"):
        procs.append(RepetitionPenaltyLogitsProcessor(case["repetition_penalty"]))
    if case.get("frequency_penalty") or case.get("presence_penalty"):
        procs.append(OpenAIPenalties(prompt_len, case.get("frequency_penalty", 0.0),
                                     case.get("presence_penalty", 0.0)))
    return procs


def hf_logprobs(hf, prompt, output):
    ids = torch.tensor([prompt + output])
    with torch.inference_mode():
        logits = hf(ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row q scores token q + 1


