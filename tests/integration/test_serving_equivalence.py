"""Greedy output is the same token for token across transformers' generate, the engine
alone, colocated serving, disaggregated serving and tensor parallel serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams

from .conftest import manifest_for, serving

MAX_NEW = 12
# Mixed lengths; with block_size 8 the longer ones span several KV blocks.
LENGTHS = [3, 9, 17, 30, 45, 64, 5, 12, 23, 40, 8, 51, 2, 33, 27, 60]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def reference(model_dir: Path, ps: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for p in ps:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def engine_alone(model_dir: Path, ps: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine.from_model_dir(model_dir, num_blocks=128, block_size=8,
                                      scheduler_config=SchedulerConfig(max_num_batched_tokens=64,
                                                                       max_model_len=8192))
    return engine.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW))


async def served(url: str, ps: list[list[int]]) -> list[list[int]]:
    """16 concurrent requests through the openai client, half of them streamed."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)

    async def one(i: int, p: list[int]) -> list[int]:
        kw = dict(model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0,
                  extra_body={"return_token_ids": True})
        if i % 2:
            ids: list[int] = []
            async for chunk in await client.completions.create(stream=True, **kw):
                ids += chunk.choices[0].model_extra.get("token_ids") or []
            return ids
        r = await client.completions.create(**kw)
        assert r.usage.completion_tokens == len(r.choices[0].model_extra["token_ids"])
        return r.choices[0].model_extra["token_ids"]

    try:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(ps))))
    finally:
        await client.close()


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def case(request, llama_dir, mixtral_dir):
    model_dir = llama_dir if request.param == "llama" else mixtral_dir
    import json

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ps = prompts(vocab)
    return request.param, model_dir, ps, reference(model_dir, ps)


def test_engine_matches_transformers(case):
    _, model_dir, ps, ref = case
    assert engine_alone(model_dir, ps) == ref


@pytest.mark.parametrize("mode,tp", [("colocated", 1), ("disaggregated", 1), ("disaggregated", 2)])
def test_serving_matches_transformers(ray_session, case, mode, tp):
    _, model_dir, ps, ref = case
    with serving(manifest_for(model_dir, mode=mode, tp=tp)) as (url, _dep):
        got = asyncio.run(served(url, ps))
    mismatches = [i for i, (a, b) in enumerate(zip(got, ref)) if a != b]
    assert not mismatches, f"{mode} tp={tp}: prompts {mismatches} differ: {got[mismatches[0]]} vs {ref[mismatches[0]]}"
