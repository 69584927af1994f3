"""Penalties, biases, min_tokens and log-probabilities in the engine's sampler, token for
token against transformers' logits processors (or a direct reference implementation of
OpenAI's definition where transformers has none), greedy, batched with plain requests;
and the split of one request over two engines (prefill samples the first token, decode
the rest) gives what one engine gives."""

from __future__ import annotations

import pytest
import torch

from engine.engine import LLMEngine
from engine.sampler import stream_seed
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from models.make import make_model
from tests.sampling_ref import hf_generate, hf_logprobs, hf_processors

MAX_NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return m.eval()


def engine(d, prefill_only=False, budget=24):
    return LLMEngine.from_model_dir(d, num_blocks=128, block_size=4,
                                    scheduler_config=SchedulerConfig(max_num_batched_tokens=budget,
                                                                     max_model_len=512,
                                                                     prefill_only=prefill_only))


def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 11, 19)]


CASES = {
    "repetition": {"repetition_penalty": 1.3},
    "repetition_below_1": {"repetition_penalty": 0.7},
    "frequency": {"frequency_penalty": 1.5},
    "presence": {"presence_penalty": 1.5},
    "negative_frequency": {"frequency_penalty": -1.0},
    "logit_bias": {"logit_bias": {17: 5.0, 23: 3.0, 5: -100.0}},
    "all": {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.3,
            "logit_bias": {40: 2.0}},
}


@pytest.mark.parametrize("name", list(CASES))
def test_processors_match_transformers_greedy(model_dir, hf, name):
    case = CASES[name]
    ps = prompts()
    eng = engine(model_dir)
    plain = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, **case)
    # Processed and plain requests share batches.
    seqs = [eng.add_request(f"p{i}", p, params) for i, p in enumerate(ps)]
    base = [eng.add_request(f"b{i}", p, plain) for i, p in enumerate(ps)]
    while eng.has_work:
        eng.step()
    changed = 0
    for p, seq, b in zip(ps, seqs, base):
        want = hf_generate(hf, p, hf_processors(case, len(p), []))
        assert seq.output_token_ids == want
        assert b.output_token_ids == hf_generate(hf, p, [])
        changed += seq.output_token_ids != b.output_token_ids
    assert changed, f"{name} changed no output: the test proves nothing"


def test_min_tokens_masks_eos_like_transformers(model_dir, hf):
    ps = prompts()
    eng = engine(model_dir)
    # Make a frequent greedy token the "EOS": without min_tokens it ends the sequence early.
    free = eng.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    eos = free[0][1]
    assert free[0][0] != eos
    for p in ps:
        held = SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[eos], min_tokens=6)
        out = eng.generate([p], held)[0]
        want = hf_generate(hf, p, hf_processors({"min_tokens": 6}, len(p), [eos]))
        # transformers does not stop at a custom id: compare up to and including it.
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert out == want[:cut]
        assert eos not in out[:6]
    assert eos in free[0] and len(eng.generate([ps[0]], SamplingParams(
        temperature=0, max_tokens=MAX_NEW, stop_token_ids=[eos]))[0]) == 2


def test_logprobs_and_prompt_logprobs_match_transformers(model_dir, hf):
    ps = prompts()
    eng = engine(model_dir, budget=8)  # prompts in several chunks
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2,
                            repetition_penalty=1.5)  # logprobs are of the raw logits
    seqs = [eng.add_request(f"r{i}", p, params) for i, p in enumerate(ps)]
    got_lp: dict[str, list] = {s.request_id: [] for s in seqs}
    got_prompt: dict[str, list] = {}
    while eng.has_work:
        out = eng.step()
        for rid, lp in out.new_logprobs.items():
            got_lp[rid].append(lp)
        got_prompt.update(out.prompt_logprobs)
    for p, seq in zip(ps, seqs):
        ref = hf_logprobs(hf, p, seq.output_token_ids)
        lps = got_lp[seq.request_id]
        assert len(lps) == len(seq.output_token_ids)
        for j, (tok, (c, ids, vals)) in enumerate(zip(seq.output_token_ids, lps)):
            row = ref[len(p) - 1 + j]
            assert abs(c - row[tok].item()) < 1e-4
            top = torch.topk(row, 3)
            assert ids == top.indices.tolist()
            assert torch.allclose(torch.tensor(vals), top.values, atol=1e-4)
        prompt_lp = got_prompt[seq.request_id]
        assert len(prompt_lp) == len(p) and prompt_lp[0] is None
        for q in range(1, len(p)):
            c, ids, vals = prompt_lp[q]
            assert abs(c - ref[q - 1][p[q]].item()) < 1e-4
            assert ids == torch.topk(ref[q - 1], 2).indices.tolist()


def split_run(model_dir, prompt, params):
    """Prefill engine samples the first token and exports KV; a decode engine continues."""
    pre = engine(model_dir, prefill_only=True)
    eng = pre
    eng.add_request("r", prompt, params)
    first_lp = None
    kv = None
    while eng.has_work:
        out = eng.step()
        first_lp = out.new_logprobs.get("r", first_lp)
        kv = out.exported_kv.get("r", kv)
        first = out.new_tokens.get("r")
    dec = engine(model_dir)
    seq = dec.add_request("r", prompt, params, output_token_ids=[first], pending_kv=kv)
    lps = [first_lp]
    while dec.has_work:
        out = dec.step()
        if "r" in out.new_logprobs:
            lps.append(out.new_logprobs["r"])
    return seq.output_token_ids, lps


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.3,
                   frequency_penalty=0.7, presence_penalty=0.4, logit_bias={11: 3.0}, logprobs=2),
    SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=MAX_NEW, ignore_eos=True,
                   repetition_penalty=1.2, logprobs=1),
], ids=["greedy-penalties", "seeded"])
def test_split_prefill_decode_equals_one_engine(model_dir, params):
    p = prompts()[1]
    eng = engine(model_dir)
    seq = eng.add_request("r", p, params)
    lps = []
    while eng.has_work:
        out = eng.step()
        if "r" in out.new_logprobs:
            lps.append(out.new_logprobs["r"])
    got, got_lps = split_run(model_dir, p, params)
    assert got == seq.output_token_ids
    for a, b in zip(got_lps, lps, strict=True):
        assert abs(a[0] - b[0]) < 1e-4 and a[1] == b[1]


def test_stream_seeds_differ_by_seed_and_index():
    seeds = {stream_seed(s, i) for s in range(4) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, repetition_penalty=5.8e-216, max_tokens=4),
                                    SamplingParams(temperature=1e-300, max_tokens=4, seed=1)])
def test_overflowing_logits_still_sample(params):
    """Found by fuzzing the API: a penalty or temperature that overflows a logit to inf
    (a NaN softmax) samples the leading token instead of failing the request."""
    from engine.sampler import Sampler
    from engine.sequence import Sequence

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    seq = Sequence("r", [1], params, eos_token_ids=[])
    assert Sampler().sample(logits, [seq]).tokens == [1]
