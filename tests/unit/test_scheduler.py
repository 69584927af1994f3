import pytest

from engine.block_manager import BlockManager
from engine.scheduler import RequestTooLargeError, Scheduler, SchedulerConfig
from engine.sequence import SamplingParams, Sequence, SeqStatus


def make(num_blocks=32, block_size=4, budget=16, chunked=True, prefill_only=False, max_seqs=8):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                          enable_chunked_prefill=chunked, prefill_only=prefill_only,
                          max_model_len=256)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, enable_prefix_caching=False))


def seq(rid, n, max_tokens=4):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=max_tokens),
                    eos_token_ids=[0])


def run_step(s: Scheduler, token=7):
    batch = s.schedule()
    sampled = {q.request_id: token for q, n in zip(batch.seqs, batch.num_tokens)
               if q.num_computed_tokens + n == q.num_tokens}
    return batch, s.postprocess(batch, sampled)


def test_chunked_prefill_respects_budget_and_decodes_come_first():
    s = make(budget=16)
    s.add(seq("long", 40))
    batch, _ = run_step(s)
    assert batch.num_tokens == [16]
    s.add(seq("short", 3))
    batch, _ = run_step(s)
    # long continues its prefill (16), short waits for budget
    assert [q.request_id for q in batch.seqs] == ["long"] and batch.num_tokens == [16]
    batch, _ = run_step(s)
    assert batch.num_tokens == [8, 3]  # long's last 8 tokens, then short's whole prompt
    batch, _ = run_step(s)
    assert all(n == 1 for n in batch.num_tokens) and len(batch.seqs) == 2


def test_no_chunking_runs_whole_prompts_only():
    s = make(budget=16, chunked=False)
    s.add(seq("a", 10))
    s.add(seq("b", 10))
    batch, _ = run_step(s)
    assert batch.num_tokens == [10]
    s2 = make(budget=16, chunked=False)
    s2.add(seq("huge", 40))  # longer than the budget: runs alone, whole
    batch, _ = run_step(s2)
    assert batch.num_tokens == [40]


def test_admission_waits_for_blocks_and_never_overflows():
    s = make(num_blocks=6, block_size=4, budget=64)  # 24 slots
    s.add(seq("a", 10, max_tokens=8))
    s.add(seq("b", 10, max_tokens=8))
    batch, _ = run_step(s)
    # a takes 3 blocks, b fits in the remaining 3
    assert [q.request_id for q in batch.seqs] == ["a", "b"]
    steps = 0
    while s.has_work:
        run_step(s)
        steps += 1
        assert s.bm.num_free_blocks >= 0
        assert steps < 100
    assert s.bm.num_free_blocks == 6


def test_preemption_recomputes_youngest():
    s = make(num_blocks=5, block_size=4, budget=64)  # 20 slots
    a, b = seq("a", 8, max_tokens=12), seq("b", 8, max_tokens=12)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 2 blocks each, 1 free
    preempted = []
    for _ in range(40):
        if not s.has_work:
            break
        batch, _ = run_step(s)
        preempted += [q.request_id for q in batch.preempted]
    assert "b" in preempted and "a" not in preempted
    assert a.finish_reason == "length" and b.finish_reason == "length"
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert s.bm.num_free_blocks == 5


def test_request_that_can_never_fit_is_rejected():
    s = make(num_blocks=4, block_size=4)
    with pytest.raises(RequestTooLargeError, match="holds 16"):
        s.add(seq("big", 10, max_tokens=10))
    with pytest.raises(RequestTooLargeError, match="context of 256"):
        s.add(seq("ctx", 250, max_tokens=10))


def test_prefill_only_finishes_after_first_token():
    s = make(prefill_only=True, budget=64)
    q = seq("p", 20)
    s.add(q)
    _, finished = run_step(s)
    assert finished == [q] and q.finish_reason == "prefill_done"
    assert q.output_token_ids == [7] and q.status is SeqStatus.FINISHED


def test_pending_kv_admitted_with_blocks_for_all_tokens():
    s = make(budget=64)
    q = Sequence("d", list(range(1, 11)), SamplingParams(temperature=0, max_tokens=3),
                 output_token_ids=[5])
    q.pending_kv = object()
    q.num_pending_kv_tokens = 10
    s.add(q)
    batch, _ = run_step(s)
    assert batch.kv_imports == [q] and batch.num_tokens == [1]
    assert len(q.block_table) == 3 and q.output_token_ids == [5, 7]


def test_stop_on_eos():
    s = make()
    q = seq("e", 5, max_tokens=10)
    s.add(q)
    _, finished = run_step(s, token=0)
    assert finished == [q] and q.finish_reason == "stop"
