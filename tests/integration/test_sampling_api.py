"""Penalties, biases and log-probabilities through the served path with the openai client,
disaggregated (first token sampled on the prefill worker, the rest on the decode worker)
and colocated, streamed and not, against transformers."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch

from tests.sampling_ref import hf_generate, hf_logprobs, hf_processors

from .conftest import manifest_for, serving

MAX_NEW = 10


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def served(request, ray_session, llama_dir):
    with serving(manifest_for(llama_dir, mode=request.param)) as (url, _dep):
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def hf(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (6, 13, 21)]


PENALTIES = [
    {"repetition_penalty": 1.4},
    {"frequency_penalty": 1.2, "presence_penalty": 0.6},
    {"logit_bias": {"17": 4.0, "230": 6.0}},
    {"repetition_penalty": 0.8, "frequency_penalty": -0.5, "logit_bias": {"99": 2.5}},
]


def ids_of(client, prompt, stream, **kw):
    body = dict(model="tiny", prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                extra_body={"return_token_ids": True, "ignore_eos": True, **kw.pop("extra", {})}, **kw)
    if stream:
        out = []
        for chunk in client.completions.create(stream=True, **body):
            out += chunk.choices[0].model_extra.get("token_ids") or []
        return out
    return client.completions.create(**body).choices[0].model_extra["token_ids"]


@pytest.mark.parametrize("case", PENALTIES, ids=["repetition", "freq-presence", "logit-bias", "mixed"])
def test_penalties_served_match_transformers(served, hf, case):
    _, client = served
    openai_keys = {"frequency_penalty", "presence_penalty", "logit_bias"}
    kw = {k: v for k, v in case.items() if k in openai_keys}
    extra = {k: v for k, v in case.items() if k not in openai_keys}
    ref_case = {**case, "logit_bias": {int(k): v for k, v in case.get("logit_bias", {}).items()}}
    changed = 0
    for i, p in enumerate(prompts()):
        want = hf_generate(hf, p, hf_processors(ref_case, len(p), []), max_new=MAX_NEW)
        got = ids_of(client, p, stream=bool(i % 2), extra=extra, **kw)
        assert got == want
        changed += got != hf_generate(hf, p, [], max_new=MAX_NEW)
    assert changed


def test_min_tokens_and_logit_bias_on_eos(served):
    _, client = served
    # +100 on EOS makes it the greedy choice at once; min_tokens holds it off.
    body = dict(model="tiny", prompt="import os", max_tokens=12, temperature=0, logit_bias={"2": 100})
    r = client.completions.create(**body)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(extra_body={"min_tokens": 5}, **body)
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(extra_body={"ignore_eos": True}, **body)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def _check_token_lps(ref_rows, tokens, token_lps, tops, k):
    for row, tok, lp, top in zip(ref_rows, tokens, token_lps, tops, strict=True):
        assert abs(lp - row[tok].item()) < 1e-4
        best = torch.topk(row, k)
        got = sorted(top.values(), reverse=True)[:k]
        assert torch.allclose(torch.tensor(got), best.values, atol=1e-4)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_and_echo_match_transformers(served, hf, llama_dir, stream):
    from engine.tokenizer import Tokenizer

    _, client = served
    tok = Tokenizer.from_dir(llama_dir)
    p = prompts()[1]
    body = dict(model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0, logprobs=3, echo=True,
                extra_body={"return_token_ids": True, "ignore_eos": True, "repetition_penalty": 1.3})
    if stream:
        text, ids = "", []
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for chunk in client.completions.create(stream=True, **body):
            c = chunk.choices[0]
            text += c.text
            ids += c.model_extra.get("token_ids") or []
            if c.logprobs is not None:
                for key in lp:
                    lp[key] += getattr(c.logprobs, key)
    else:
        c = client.completions.create(**body).choices[0]
        text, ids = c.text, c.model_extra["token_ids"]
        lp = {key: getattr(c.logprobs, key) for key in ("tokens", "token_logprobs", "top_logprobs",
                                                        "text_offset")}
    ref = hf_logprobs(hf, p, ids)
    n = len(p)
    assert len(lp["token_logprobs"]) == n + len(ids) == len(lp["tokens"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # Prompt token q is scored by row q - 1; generated token j by row n - 1 + j.
    _check_token_lps(ref[: n - 1], p[1:], lp["token_logprobs"][1:n], lp["top_logprobs"][1:n], 3)
    _check_token_lps(ref[n - 1:n - 1 + len(ids)], ids, lp["token_logprobs"][n:], lp["top_logprobs"][n:], 3)
    assert all(len(t) in (3, 4) for t in lp["top_logprobs"][1:])
    echo = tok.decode(p)
    offs = lp["text_offset"]
    assert text.startswith(echo) and offs[n] == len(echo)
    assert offs == sorted(offs) and offs[0] == 0 and all(o <= len(text) for o in offs)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_match_transformers(served, hf, llama_dir, stream):
    from engine.tokenizer import Tokenizer

    _, client = served
    msgs = [{"role": "user", "content": "def add(a, b):"}]
    prompt = Tokenizer.from_dir(llama_dir).encode_chat(msgs)
    body = dict(model="tiny", messages=msgs, max_tokens=MAX_NEW, temperature=0, logprobs=True,
                top_logprobs=4, extra_body={"return_token_ids": True, "ignore_eos": True})
    if stream:
        content, ids = [], []
        for chunk in client.chat.completions.create(stream=True, **body):
            c = chunk.choices[0]
            ids += c.model_extra.get("token_ids") or []
            if c.logprobs is not None:
                content += c.logprobs.content
    else:
        c = client.chat.completions.create(**body).choices[0]
        content, ids = c.logprobs.content, c.model_extra["token_ids"]
    ref = hf_logprobs(hf, prompt, ids)[len(prompt) - 1:len(prompt) - 1 + len(ids)]
    assert len(content) == len(ids)
    for row, tok, item in zip(ref, ids, content, strict=True):
        assert abs(item.logprob - row[tok].item()) < 1e-4
        assert len(item.top_logprobs) == 4
        best = torch.topk(row, 4).values
        assert torch.allclose(torch.tensor([t.logprob for t in item.top_logprobs]), best, atol=1e-4)
        assert math.isclose(item.top_logprobs[0].logprob, row.max().item(), abs_tol=1e-4)


def test_list_of_prompts_gives_one_choice_each(served, hf):
    url, _ = served
    ps = prompts()

    async def go():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)
        try:
            r = await client.completions.create(model="tiny", prompt=ps, max_tokens=MAX_NEW, temperature=0,
                                                extra_body={"return_token_ids": True, "ignore_eos": True})
            s = await client.completions.create(model="tiny", prompt=ps, max_tokens=MAX_NEW, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"return_token_ids": True, "ignore_eos": True})
            streamed: dict[int, list[int]] = {i: [] for i in range(len(ps))}
            usage = None
            async for chunk in s:
                for c in chunk.choices:
                    streamed[c.index] += c.model_extra.get("token_ids") or []
                usage = chunk.usage or usage
            return r, streamed, usage
        finally:
            await client.close()

    r, streamed, usage = asyncio.run(go())
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, p in enumerate(ps):
        want = hf_generate(hf, p, [], max_new=MAX_NEW)
        assert r.choices[i].model_extra["token_ids"] == want
        assert streamed[i] == want
    assert r.usage.prompt_tokens == sum(map(len, ps)) and r.usage.completion_tokens == 3 * MAX_NEW
    assert usage.prompt_tokens == sum(map(len, ps))
