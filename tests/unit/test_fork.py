"""Several choices of one prompt (n > 1): the prompt is computed once, the choices fork
its KV (shared full blocks, a copied partial block), and each equals a single request
with its own params and seed stream, in one engine and split prefill -> decode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from models.make import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")


def engine(d, prefill_only=False, num_blocks=128, budget=16):
    return LLMEngine.from_model_dir(d, num_blocks=num_blocks, block_size=4,
                                    scheduler_config=SchedulerConfig(max_num_batched_tokens=budget,
                                                                     max_model_len=512,
                                                                     prefill_only=prefill_only))


def prompt(n):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def run(eng):
    lps: dict[str, list] = {}
    while eng.has_work:
        out = eng.step()
        for rid, lp in out.new_logprobs.items():
            lps.setdefault(rid, []).append(lp)
    return lps


def choice_params(base: SamplingParams, n: int) -> list[SamplingParams]:
    return [dataclasses.replace(base, seed=None if base.seed is None else base.seed + j) for j in range(n)]


BASES = [
    SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=0.8, top_k=20, seed=9, max_tokens=7, ignore_eos=True, repetition_penalty=1.2),
]


# A partial last block, and whole blocks only.
@pytest.mark.parametrize("plen,base", [(9, BASES[0]), (12, BASES[1])], ids=["partial-plain", "whole-penalised"])
def test_n_choices_equal_single_requests_and_prefill_once(model_dir, plen, base):
    p = prompt(plen)
    ps = choice_params(base, 3)
    eng = engine(model_dir)
    eng.add_request("other", prompt(5), SamplingParams(temperature=0, max_tokens=6))
    eng.add_request("r0", p, ps[0], children=[("r1", ps[1], None), ("r2", ps[2], None)])
    outs: dict[str, list[int]] = {}
    lps: dict[str, list] = {}
    while eng.has_work:
        out = eng.step()
        for rid, t in out.new_tokens.items():
            outs.setdefault(rid, []).append(t)
        for rid, lp in out.new_logprobs.items():
            lps.setdefault(rid, []).append(lp)
    assert eng.scheduler.prompt_tokens_computed == plen + 5  # each prompt once
    assert eng.bm.num_free_blocks == eng.bm.num_blocks
    singles = []
    for j, pj in enumerate(ps):
        e1 = engine(model_dir)
        s = e1.add_request("x", p, pj)
        single_lps = run(e1).get("x")
        assert outs[f"r{j}"] == s.output_token_ids
        if single_lps is not None:
            assert [lp[0] for lp in lps[f"r{j}"]] == pytest.approx([lp[0] for lp in single_lps], abs=1e-4)
        singles.append(tuple(s.output_token_ids))
    assert len(set(singles)) == 3  # the streams differ


def test_children_outputs_and_block_sharing(model_dir):
    p = prompt(10)
    ps = choice_params(BASES[0], 3)
    eng = engine(model_dir)
    eng.add_request("r0", p, ps[0], children=[("r1", ps[1], None), ("r2", ps[2], None)])
    outs: dict[str, list[int]] = {}
    shared_seen = False
    while eng.has_work:
        out = eng.step()
        for rid, t in out.new_tokens.items():
            outs.setdefault(rid, []).append(t)
        running = {s.request_id: s for s in eng.scheduler.running}
        if {"r0", "r1", "r2"} <= set(running):
            tables = [running[r].block_table for r in ("r0", "r1", "r2")]
            # 10 tokens in blocks of 4: two full blocks shared, the partial one copied.
            assert tables[0][:2] == tables[1][:2] == tables[2][:2]
            assert len({t[2] for t in tables}) == 3
            assert all(eng.bm.blocks[b].ref_count == 3 for b in tables[0][:2])
            shared_seen = True
    assert shared_seen
    assert eng.bm.num_free_blocks == eng.bm.num_blocks
    for j, pj in enumerate(ps):
        e1 = engine(model_dir)
        assert outs[f"r{j}"] == e1.generate([p], pj)[0]


def test_split_prefill_decode_with_children(model_dir):
    p = prompt(11)
    ps = choice_params(BASES[1], 3)
    pre = engine(model_dir, prefill_only=True)
    pre.add_request("r0", p, ps[0], children=[("r1", ps[1], None), ("r2", ps[2], None)])
    firsts: dict[str, int] = {}
    kv = None
    while pre.has_work:
        out = pre.step()
        firsts.update(out.new_tokens)
        kv = out.exported_kv.get("r0", kv)
    assert set(firsts) == {"r0", "r1", "r2"} and pre.scheduler.prompt_tokens_computed == 11
    dec = engine(model_dir)
    dec.add_request("r0", p, ps[0], output_token_ids=[firsts["r0"]], pending_kv=kv,
                    children=[("r1", ps[1], [firsts["r1"]]), ("r2", ps[2], [firsts["r2"]])])
    outs = {r: [t] for r, t in firsts.items()}
    while dec.has_work:
        for rid, t in dec.step().new_tokens.items():
            outs[rid].append(t)
    assert dec.scheduler.prompt_tokens_computed == 0
    for j, pj in enumerate(ps):
        assert outs[f"r{j}"] == engine(model_dir).generate([p], pj)[0]
