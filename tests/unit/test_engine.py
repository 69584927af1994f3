"""The engine alone: prefix caching, preemption under memory pressure, sampling
parameters and bf16 all keep outputs right."""

import pytest
import torch

from models.make import make_model
from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")


def engine(d, num_blocks=64, dtype="float32", budget=32):
    return LLMEngine.from_model_dir(d, dtype=dtype, num_blocks=num_blocks, block_size=4,
                                    scheduler_config=SchedulerConfig(max_num_batched_tokens=budget,
                                                                     max_model_len=8192))


def prompt(n, seed=0):
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefix_cache_hit_gives_same_output(model_dir):
    eng = engine(model_dir)
    p = prompt(30)
    first = eng.generate([p], GREEDY)[0]
    seq = eng.add_request("again", p, GREEDY)
    while eng.has_work:
        eng.step()
    assert seq.num_cached_tokens == 28  # 7 full blocks reused, the last token recomputed
    assert seq.output_token_ids == first
    assert eng.bm.prefix_hits >= 1


def test_preemption_under_memory_pressure_keeps_outputs(model_dir):
    ps = [prompt(12, s) for s in range(6)]
    roomy = engine(model_dir, num_blocks=256).generate(ps, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    tight = engine(model_dir, num_blocks=20)  # 80 slots for 6 x 32 tokens: must preempt
    seqs = [tight.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
            for i, p in enumerate(ps)]
    preempted = 0
    while tight.has_work:
        preempted += len(tight.step().preempted)
    assert preempted > 0
    assert [s.output_token_ids for s in seqs] == roomy


def test_seeded_sampling_is_reproducible_and_params_bite(model_dir):
    p = prompt(10)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=12, ignore_eos=True)
    a = engine(model_dir).generate([p], sp)[0]
    b = engine(model_dir).generate([p], sp)[0]
    c = engine(model_dir).generate([p], SamplingParams(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True))[0]
    assert a == b and a != c
    k1 = engine(model_dir).generate([p], SamplingParams(temperature=5.0, top_k=1, seed=1, max_tokens=8, ignore_eos=True))[0]
    assert k1 == engine(model_dir).generate([p], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]


def test_stop_token_ids_and_max_tokens(model_dir):
    p = prompt(10)
    full = engine(model_dir).generate([p], GREEDY)[0]
    stop_at = full[3]
    out = engine(model_dir).generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                         stop_token_ids=[stop_at]))[0]
    assert out == full[: full.index(stop_at) + 1]


def test_bf16_runs_and_tracks_fp32(model_dir):
    p = prompt(40)
    e32, e16 = engine(model_dir), engine(model_dir, dtype="bfloat16")
    out16 = e16.generate([p], GREEDY)[0]
    assert len(out16) == 10
    agree = sum(a == b for a, b in zip(out16, e32.generate([p], GREEDY)[0]))
    assert agree >= 3  # bf16 drifts, but starts on the same path
