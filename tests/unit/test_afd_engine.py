"""Attention/expert disaggregation at engine level (engine.afd, no Ray): the split decode
step gives the monolithic engine's and transformers' greedy tokens, for mixed-length
batches, 1 and 2 micro-batches, 2 and 3 expert shards and uneven placements with
replicas; the prompt KV may come from a prefill-only engine, as in serving."""

from __future__ import annotations

import pytest
import torch

from engine.afd import local_afd_runner, split_micro_batches
from engine.experts import ExpertRequest, ExpertShard, even_placement, placement_problems, shard_experts
from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir
from tests.unit.paged_greedy import hf_greedy

MAX_NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW)
# Prompt lengths of one batch: decodes and prefill chunks of different sizes mix in steps.
LENGTHS = [3, 11, 5, 26, 1, 17]

# Shard 0 holds 5 experts, shard 1 three; experts 2 and 6 have a replica on both.
UNEVEN_2 = [[0, 1, 2, 3, 6], [2, 4, 5, 6, 7]]
# Three shards, one with a single expert, replicas of 0 and 7.
UNEVEN_3 = [[0, 1, 2, 7], [3], [4, 5, 6, 0, 7]]


@pytest.fixture(scope="module")
def model_dir():
    return str(builtin_model_dir("tiny-mixtral"))


@pytest.fixture(scope="module")
def cfg(model_dir):
    return ModelConfig.from_dir(model_dir)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def sched(budget: int = 24) -> SchedulerConfig:
    return SchedulerConfig(max_num_batched_tokens=budget, max_model_len=4096)


def placement_of(name: str, cfg: ModelConfig):
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    if name == "even2":
        return even_placement(L, E, 2)
    if name == "even3":
        return even_placement(L, E, 3)
    if name == "uneven2":
        return [[list(s) for s in UNEVEN_2] for _ in range(L)]
    # uneven3 on even layers, another uneven layout on odd ones: layers may differ.
    return [[list(s) for s in (UNEVEN_3 if i % 2 == 0 else [[7, 6], [5, 4, 3, 2], [1, 0, 6]])] for i in range(L)]


@pytest.fixture(scope="module")
def monolithic(model_dir, cfg):
    eng = LLMEngine.from_model_dir(model_dir, num_blocks=128, block_size=4, scheduler_config=sched())
    return eng.generate(prompts(cfg.vocab_size), GREEDY)


@pytest.fixture(scope="module")
def reference(model_dir, cfg):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return [hf_greedy(hf, p, MAX_NEW) for p in prompts(cfg.vocab_size)]


def test_monolithic_equals_transformers(monolithic, reference):
    assert monolithic == reference


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("layout", ["even2", "even3", "uneven2", "uneven3"])
def test_afd_greedy_equals_monolithic_and_transformers(model_dir, cfg, monolithic, reference, layout,
                                                       micro_batches):
    placement = placement_of(layout, cfg)
    runner = local_afd_runner(model_dir, "float32", 128, 4, placement, micro_batches=micro_batches)
    eng = LLMEngine(runner, sched(), 128, eos_token_ids=cfg.eos_token_ids)
    out = eng.generate(prompts(cfg.vocab_size), GREEDY)
    assert out == monolithic
    assert out == reference
    # Every routed choice reached a shard that holds its expert and was computed once.
    shards = runner.exchange.shards  # type: ignore[attr-defined]
    routed = int(runner.expert_load.sum())
    assert routed > 0 and sum(s.rows for s in shards) == routed
    for s, shard in enumerate(shards):
        for (layer, e), n in shard.load.items():
            assert e in placement[layer][s] and n > 0
    if micro_batches == 2:
        assert runner.total.steps > 0


def test_afd_decode_from_prefill_kv(model_dir, cfg, monolithic):
    """The serving path: a prefill-only engine computes the prompt and the first token;
    the attention side imports that KV and decodes with the experts elsewhere."""
    prefill = LLMEngine.from_model_dir(model_dir, num_blocks=128, block_size=4,
                                       scheduler_config=SchedulerConfig(max_num_batched_tokens=64,
                                                                        prefill_only=True, max_model_len=4096))
    runner = local_afd_runner(model_dir, "float32", 128, 4, placement_of("uneven3", cfg), micro_batches=2)
    eng = LLMEngine(runner, sched(), 128, eos_token_ids=cfg.eos_token_ids)
    ps = prompts(cfg.vocab_size)
    seqs = []
    for i, p in enumerate(ps):
        prefill.add_request(f"p{i}", p, GREEDY)
    first: dict[str, int] = {}
    kv: dict[str, torch.Tensor] = {}
    while prefill.has_work:
        out = prefill.step()
        first.update(out.new_tokens)
        kv.update(out.exported_kv)
    for i, p in enumerate(ps):
        seqs.append(eng.add_request(f"d{i}", p, GREEDY, output_token_ids=[first[f"p{i}"]], pending_kv=kv[f"p{i}"]))
    while eng.has_work:
        eng.step()
    got = [s.output_token_ids for s in seqs]
    # A prompt whose first token is EOS finishes at prefill; decode then adds tokens.
    assert [g[:len(m)] for g, m in zip(got, monolithic)] == monolithic


def test_split_micro_batches_balances_tokens_and_keeps_sequences_whole():
    meta = AttentionMetadata(query_lens=[1, 1, 1, 1, 1, 9], context_lens=[5, 6, 7, 8, 9, 9],
                             block_tables=[[i] for i in range(6)], slot_mapping=torch.arange(14), block_size=16)
    parts = split_micro_batches(meta, 2)
    assert [(a, b) for a, b, _ in parts] == [(0, 5), (5, 14)]
    assert parts[1][2].query_lens == [9] and parts[1][2].slot_mapping.tolist() == list(range(5, 14))
    even = split_micro_batches(AttentionMetadata([1] * 6, [3] * 6, [[0]] * 6, torch.arange(6), 16), 2)
    assert [(a, b) for a, b, _ in even] == [(0, 3), (3, 6)]
    assert len(split_micro_batches(AttentionMetadata([4], [4], [[0]], torch.arange(4), 16), 2)) == 1


def test_placement_checks_and_shard_refuses_experts_it_lacks(model_dir, cfg):
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    assert placement_problems(even_placement(L, E, 3), L, E) == []
    assert any("layers; the model has" in p for p in placement_problems(even_placement(L + 1, E, 2), L, E))
    hole = even_placement(L, E, 2)
    hole[1][0].remove(0)
    assert placement_problems(hole, L, E) == ["layer 1: experts [0] have no replica"]
    assert any("outside 0..7" in p for p in placement_problems([[[0, 1, 2, 3, 9], [4, 5, 6, 7]]] * L, L, E))
    shard = ExpertShard.load_from(model_dir, torch.float32, shard_experts(even_placement(L, E, 2), 0))
    with pytest.raises(KeyError, match="expert 5 is not held here"):
        shard.run(ExpertRequest(0, torch.zeros(2, cfg.hidden_size), [(5, 2)]))
    with pytest.raises(ValueError, match="dense"):
        from engine.afd import build_attention_runner
        from engine.experts import LocalExchange

        build_attention_runner(str(builtin_model_dir("tiny-llama")), "float32", 8, 4,
                               LocalExchange([[[0]]], [ExpertShard([{}])]), 1)


def test_live_replacement_between_steps_keeps_outputs(model_dir, cfg, monolithic):
    """Copy, switch, drop while sequences decode: outputs stay the monolithic engine's."""
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    old = even_placement(L, E, 2)
    new = [[[4, 5, 6, 7, 0], [0, 1, 2, 3]] for _ in range(L)]  # experts change homes
    runner = local_afd_runner(model_dir, "float32", 128, 4, old, micro_batches=2)
    eng = LLMEngine(runner, sched(), 128, eos_token_ids=cfg.eos_token_ids)
    seqs = [eng.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts(cfg.vocab_size))]
    for _ in range(4):
        eng.step()
    shards = runner.exchange.shards  # type: ignore[attr-defined]
    loaded = [sh.add(model_dir, torch.float32, shard_experts(new, s)) for s, sh in enumerate(shards)]
    assert loaded == [4 * L, 4 * L]
    runner.set_placement(new)
    assert [sh.drop_except(shard_experts(new, s)) for s, sh in enumerate(shards)] == [3 * L, 4 * L]
    assert shards[0].experts[0] == [0, 4, 5, 6, 7] and shards[1].experts[0] == [0, 1, 2, 3]
    before = {k: v for k, v in shards[0].load.items()}
    while eng.has_work:
        eng.step()
    assert [s.output_token_ids for s in seqs] == monolithic
    assert any(shards[0].load.get((0, e), 0) > before.get((0, e), 0) for e in (4, 5, 6, 7))
    with pytest.raises(ValueError, match="no replica"):
        runner.set_placement([[[0], [1]]] * L)
