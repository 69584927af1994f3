"""An aborted request never writes its KV into blocks given to another request: the
engine imports a request's transferred KV only in the step that gives it its blocks, and
an abort frees them between steps, so KV that lands after (or just before) an abort goes
nowhere. Poisoned KV (huge values) on the aborted requests would change any neighbour's
greedy output if a single value reached its blocks."""

import pytest
import torch

from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from models.make import make_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")


def engine(d, num_blocks=24):
    return LLMEngine.from_model_dir(d, dtype="float32", num_blocks=num_blocks, block_size=4,
                                    scheduler_config=SchedulerConfig(max_num_batched_tokens=64,
                                                                     max_model_len=8192))


def prompt(n, seed):
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def poisoned_kv(eng, n):
    cfg = eng.runner.model.cfg
    return torch.full((cfg.num_hidden_layers, 2, n, cfg.num_key_value_heads, cfg.head_dim), 1e4)


def run(eng, seqs):
    while eng.has_work:
        eng.step()
    return [s.output_token_ids for s in seqs]


def test_aborts_racing_kv_imports_leave_neighbours_unchanged(model_dir):
    goods = [prompt(9 + 5 * i, seed=i) for i in range(4)]
    ref = engine(model_dir).generate(goods, GREEDY)
    # Few blocks: the aborted requests' blocks go to the good ones at once.
    eng = engine(model_dir, num_blocks=24)
    outs = []
    for rnd in range(3):
        victims = []
        for k in range(3):
            p = prompt(20, seed=100 + 10 * rnd + k)
            out = list(p[-1:])  # as a decode worker gets it: the first token sampled elsewhere
            victims.append(eng.add_request(f"v{rnd}-{k}", p, GREEDY, output_token_ids=out,
                                           pending_kv=poisoned_kv(eng, len(p))))
        if rnd == 0:   # aborted before their KV was imported (it was "in flight")
            for v in victims:
                assert eng.abort(v.request_id)
        elif rnd == 1:  # imported (the step that gave them blocks), then aborted
            eng.step()
            assert any(v.block_table for v in victims)
            for v in victims:
                eng.abort(v.request_id)
        else:  # aborted between steps while neighbours run
            seqs = [eng.add_request(f"g{rnd}-{i}", p, GREEDY) for i, p in enumerate(goods)]
            eng.step()
            for v in victims:
                eng.abort(v.request_id)
            outs.append(run(eng, seqs))
            continue
        seqs = [eng.add_request(f"g{rnd}-{i}", p, GREEDY) for i, p in enumerate(goods)]
        outs.append(run(eng, seqs))
    for got in outs:
        assert got == ref
    assert eng.bm.num_used_blocks == 0
