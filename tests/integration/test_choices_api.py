"""Several choices per prompt through the served path (openai client), disaggregated and
colocated: n=3 with a seed equals three single requests with seeds seed, seed+1, seed+2
(streamed and not); the prompt is prefilled once (the workers' prompt-token counter);
best_of returns the n choices with the highest cumulative logprob."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
import torch

from .conftest import manifest_for, serving


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def served(request, ray_session, llama_dir):
    with serving(manifest_for(llama_dir, mode=request.param)) as (url, _dep):
        yield url, request.param, openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)


def prompt(n, seed):
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def body(p, **kw):
    extra = {"return_token_ids": True, "ignore_eos": True, **kw.pop("extra", {})}
    return dict(model="tiny", prompt=p, max_tokens=8, temperature=1.0, extra_body=extra, **kw)


def prompt_tokens_computed(url: str, pool: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pat = re.compile(r'^splitserve_worker_prompt_tokens_computed\{[^}]*pool="%s"[^}]*\} (\S+)$' % pool)
    return int(sum(float(m.group(1)) for line in text.splitlines() if (m := pat.match(line))))


def settled(url: str, pool: str, before: int, timeout_s: float = 20.0) -> int:
    """The counter once it moved off `before` (the controller polls workers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = prompt_tokens_computed(url, pool)
        if now != before:
            time.sleep(1.5)  # one more poll period: nothing else is running
            return prompt_tokens_computed(url, pool)
        time.sleep(0.2)
    raise TimeoutError(f"prompt token counter of {pool} stayed at {before}")


def stable(url: str, pool: str) -> int:
    """The counter once two reads a few poll periods apart agree (earlier work reported)."""
    last = prompt_tokens_computed(url, pool)
    for _ in range(20):
        time.sleep(1.5)
        now = prompt_tokens_computed(url, pool)
        if now == last:
            return now
        last = now
    raise TimeoutError(f"prompt token counter of {pool} kept moving")


@pytest.mark.parametrize("stream", [False, True])
def test_n3_equals_three_seeded_singles_and_prefills_once(served, stream):
    url, mode, client = served
    pool = "prefill" if mode == "disaggregated" else "colocated"
    p = prompt(21, 100 + stream)  # a fresh prompt: no prefix-cache hits
    before = stable(url, pool)
    if stream:
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for chunk in client.completions.create(stream=True, **body(p, n=3, seed=40)):
            for c in chunk.choices:
                got[c.index] += c.model_extra.get("token_ids") or []
        outs = [got[i] for i in range(3)]
    else:
        r = client.completions.create(**body(p, n=3, seed=40))
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert r.usage.prompt_tokens == 21 and r.usage.completion_tokens == 24
        outs = [c.model_extra["token_ids"] for c in r.choices]
    assert settled(url, pool, before) - before == 21  # one prefill for the three choices
    singles = [client.completions.create(**body(p, seed=40 + j)).choices[0].model_extra["token_ids"]
               for j in range(3)]
    assert outs == singles
    assert len({tuple(o) for o in outs}) == 3


def test_chat_n_and_list_of_prompts_with_n(served):
    _, _, client = served
    msgs = [{"role": "user", "content": "def main():"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, n=2, seed=3,
                                       temperature=1.0, extra_body={"ignore_eos": True})
    s = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, seed=4, temperature=1.0,
                                       extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.choices[1].message.content == s.choices[0].message.content
    ps = [prompt(7, 1), prompt(9, 2)]
    r = client.completions.create(**body(ps, n=2, seed=8))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(ps):
        for j in range(2):
            one = client.completions.create(**body(p, seed=8 + j)).choices[0].model_extra["token_ids"]
            assert r.choices[2 * i + j].model_extra["token_ids"] == one


def test_best_of_returns_highest_cumulative_logprob(served):
    _, _, client = served
    p = prompt(12, 5)
    r = client.completions.create(**body(p, n=2, best_of=4, seed=60, logprobs=0))
    assert [c.index for c in r.choices] == [0, 1]
    cums = []
    for j in range(4):
        c = client.completions.create(**body(p, seed=60 + j, logprobs=0)).choices[0]
        cums.append((sum(c.logprobs.token_logprobs), c.model_extra["token_ids"]))
    best = sorted(cums, key=lambda x: -x[0])[:2]
    assert [c.model_extra["token_ids"] for c in r.choices] == [b[1] for b in best]
    for c, (cum, _) in zip(r.choices, best):
        assert abs(sum(c.logprobs.token_logprobs) - cum) < 1e-3
    # Without logprobs asked, best_of still ranks but returns none.
    r2 = client.completions.create(**body(p, n=2, best_of=4, seed=60))
    assert [c.model_extra["token_ids"] for c in r2.choices] == [b[1] for b in best]
    assert all(c.logprobs is None for c in r2.choices)
