from placement.latency import Coeffs, LatencyModel
from placement.simulator import (ClusterSpec, Instance, SimRequest, Simulation, attainment,
                                 max_goodput_rate, poisson_requests)

LM = LatencyModel(Coeffs(0.01, 1e-4, 0.0), Coeffs(0.005, 0.0, 1e-3))


def test_single_request_latencies_match_the_model():
    spec = ClusterSpec([Instance("prefill", LM), Instance("decode", LM)], kv_bytes_per_token=1000,
                       link_bps=lambda a, b: 1e6)
    r = SimRequest(0.0, 100, 5)
    Simulation(spec).run([r])
    prefill = 0.01 + 100 * 1e-4
    assert abs(r.ttft_s - prefill) < 1e-9
    transfer = 100 * 1000 / 1e6
    step = 0.005 + 1e-3
    assert abs(r.finish_s - (prefill + transfer + 4 * step)) < 1e-9
    assert abs(r.tpot_s - (transfer + 4 * step) / 4) < 1e-9


def test_colocated_chunked_prefill():
    spec = ClusterSpec([Instance("colocated", LM, max_batched_tokens=64)])
    r = SimRequest(0.0, 100, 3)
    Simulation(spec).run([r])
    # 64 + 36 tokens in two steps, then 2 decode steps
    assert abs(r.ttft_s - (0.01 + 64e-4 + 0.01 + 36e-4)) < 1e-9
    assert r.finish_s > r.first_token_s


def test_whole_prompt_first_stalls_decodes():
    """vLLM <= 0.3's scheduler (prefill_first): a prompt arriving while another request
    decodes gets a step of its own, and the decode produces no token in it; with chunked
    prefill the decode rides along in the same step."""
    def run(prefill_first: bool) -> tuple[SimRequest, SimRequest]:
        spec = ClusterSpec([Instance("colocated", LM, max_batched_tokens=4096, prefill_first=prefill_first)])
        a, b = SimRequest(0.0, 10, 6), SimRequest(0.02, 1000, 2)
        Simulation(spec).run([a, b])
        return a, b

    a_first, b_first = run(True)
    a_mixed, b_mixed = run(False)
    prefill_1000 = 0.01 + 1000 * 1e-4
    # The prompt waits at most for the decode step in flight, then runs alone...
    assert prefill_1000 <= b_first.ttft_s <= prefill_1000 + 0.006 + 1e-9
    # ...and the decoding request loses that step: it finishes a full prefill later than
    # it would have decoding alone, and later than with the decode riding along.
    alone = SimRequest(0.0, 10, 6)
    Simulation(ClusterSpec([Instance("colocated", LM, max_batched_tokens=4096)])).run([alone])
    assert a_first.finish_s >= alone.finish_s + prefill_1000 - 1e-9
    assert a_first.finish_s > a_mixed.finish_s
    assert a_first.generated == a_mixed.generated == 6


def test_link_contention_serialises_transfers():
    spec = ClusterSpec([Instance("prefill", LM), Instance("decode", LM, node=1)], kv_bytes_per_token=1e4,
                       link_bps=lambda a, b: 1e6)
    a, b = SimRequest(0.0, 100, 2), SimRequest(0.0, 100, 2)
    Simulation(spec).run([a, b])
    # both prefilled in one batch, then 1 s of transfer each, one after the other
    assert b.finish_s - a.finish_s > 0.9


def test_goodput_search_brackets_the_knee():
    def spec():
        return ClusterSpec([Instance("colocated", LM)])

    def reqs(rate):
        return poisson_requests(rate, 200, lambda g: 128, lambda g: 16, seed=1)

    rate = max_goodput_rate(spec, reqs, ttft_s=0.2, tpot_s=0.05, target=0.9)
    assert rate > 0
    assert attainment(Simulation(spec()).run(reqs(rate)), 0.2, 0.05) >= 0.9
    assert attainment(Simulation(spec()).run(reqs(rate * 1.5)), 0.2, 0.05) < 0.9


# -- serving overheads, pipeline stages, attention/expert decode ----------------------------

from dataclasses import replace  # noqa: E402

from placement.attention_expert import AttentionExpert  # noqa: E402
from placement.latency import Overheads  # noqa: E402


def test_overhead_terms_are_applied():
    over = Overheads(request_s=0.004, prompt_token_s=1e-5, decode_start_s=0.003, step_s=0.0005,
                     stream_token_s=0.002)
    spec = ClusterSpec([Instance("prefill", LM), Instance("decode", LM)], kv_bytes_per_token=1000,
                       link_bps=lambda a, b: 1e6, **over.spec_kwargs())
    r = SimRequest(0.0, 100, 5)
    Simulation(spec).run([r])
    prefill = 0.01 + 100 * 1e-4
    assert abs(r.ttft_s - (0.004 + 100 * 1e-5 + prefill)) < 1e-9
    transfer = 100 * 1000 / 1e6
    step = 0.005 + 1e-3 + 0.0005 + 0.002  # engine step + per step + one streamed token
    assert abs(r.tpot_s - (transfer + 0.003 + 4 * step) / 4) < 1e-9


def test_stream_overhead_grows_with_the_batch():
    def tpot(n: int, over: float) -> float:
        spec = ClusterSpec([Instance("colocated", LM)], stream_overhead_s=over)
        reqs = [SimRequest(0.0, 8, 10) for _ in range(n)]
        Simulation(spec).run(reqs)
        return reqs[1 if n > 1 else 0].tpot_s

    # One sequence: one streamed token per step.
    assert abs(tpot(1, 0.002) - tpot(1, 0.0) - 0.002) < 1e-9
    # Four (the first prefilled alone, then the others beside its decode): 3 to 4 tokens
    # streamed per step.
    grow = tpot(4, 0.002) - tpot(4, 0.0)
    assert 3 * 0.002 <= grow <= 4 * 0.002 + 1e-9, grow


def test_pipeline_stages_overlap_batches():
    # Whole-model prefill 0.2 s for one 1000-token prompt; as 2 stages of 0.1 s.
    lm1 = LatencyModel(Coeffs(0.1, 1e-4, 0.0), Coeffs(0.005, 0.0, 1e-3))

    def run(pp: int | None) -> list[SimRequest]:
        spec = ClusterSpec([Instance("prefill", lm1, max_batched_tokens=1000, pp=pp), Instance("decode", lm1)],
                           link_bps=lambda a, b: 1e12)
        reqs = [SimRequest(0.0, 1000, 1) for _ in range(10)]
        return Simulation(spec).run(reqs)

    one, two = run(None), run(2)
    # The first prompt sees every stage either way ...
    assert abs(one[0].ttft_s - 0.2) < 1e-9 and abs(two[0].ttft_s - 0.2) < 1e-9
    # ... but stage 1 takes the next prompt while stage 2 finishes this one.
    assert abs(max(r.first_token_s for r in one) - 10 * 0.2) < 1e-9
    assert abs(max(r.first_token_s for r in two) - (0.2 + 9 * 0.1)) < 1e-9
    reqs = run(4)
    assert abs(max(r.first_token_s for r in reqs) - (0.2 + 9 * 0.05)) < 1e-9
    # A pp model without Instance.pp keeps the older one-step-at-a-time behaviour.
    spec = ClusterSpec([Instance("prefill", replace(lm1, pp=2), max_batched_tokens=1000), Instance("decode", lm1)],
                       link_bps=lambda a, b: 1e12)
    reqs = Simulation(spec).run([SimRequest(0.0, 1000, 1) for _ in range(10)])
    assert abs(max(r.first_token_s for r in reqs) - 10 * 0.2) < 1e-9


def test_pipelined_decode_keeps_each_sequence_in_one_stage_at_a_time():
    # Decode costs 0.01 s per sequence per step (whole model).
    lm = LatencyModel(Coeffs(0.0, 1e-6, 0.0), Coeffs(0.0, 0.0, 0.01))

    def tpots(pp: int, n: int) -> list[float]:
        spec = ClusterSpec([Instance("colocated", replace(lm, pp=pp), max_batched_tokens=4096, pp=pp)])
        reqs = [SimRequest(0.0, 10, 21) for _ in range(n)]
        Simulation(spec).run(reqs)
        return [r.tpot_s for r in reqs]

    # A lone sequence cannot pipeline: each token needs the last one's full pass.
    assert abs(tpots(2, 1)[0] - 0.01) < 1e-9
    assert abs(tpots(1, 1)[0] - 0.01) < 1e-9
    # Two sequences: one stage each (micro-batches), vs one batch of two on one stage.
    assert max(tpots(1, 2)) > 0.0195
    assert max(tpots(2, 2)) < 0.0105


def test_attention_expert_decode_instance():
    ae = AttentionExpert(attention=Coeffs(1e-4, 1e-7, 1e-5), expert=Coeffs(1e-3, 2e-5, 0.0),
                         comm=Coeffs(5e-5, 0.0, 0.0), layers=8, micro_batches=2)
    spec = ClusterSpec([Instance("prefill", LM), Instance("ae_decode", LM, ae=ae)], link_bps=lambda a, b: 1e12)
    r = SimRequest(0.0, 100, 5)
    Simulation(spec).run([r])
    assert abs(r.tpot_s - ae.step_s(1, 101)) < 0.2 * ae.step_s(1, 101)  # context grows by a token a step
    assert abs(r.tpot_s - LM.decode_s(1, 101)) > 1e-3  # not the dense decode model
    # More micro-batches overlap the pools: a busier step beats the one-micro-batch layout.
    one = replace(ae, micro_batches=1)
    assert ae.step_s(64, 64 * 500) < one.step_s(64, 64 * 500)


def test_positional_instance_copy_still_works():
    # placement/search.py copies instances positionally; new fields must come after.
    i = Instance("decode", LM, 1, 256, 32, 1000)
    assert (i.kind, i.node, i.max_batched_tokens, i.max_num_seqs, i.kv_capacity_tokens) == ("decode", 1, 256, 32, 1000)
    assert i.pp is None and i.ae is None and i.stages == 1


def test_prefill_worker_overheads_lengthen_its_steps():
    spec = ClusterSpec([Instance("prefill", LM, max_batched_tokens=1000), Instance("decode", LM)],
                       link_bps=lambda a, b: 1e12, prefill_token_overhead_s=1e-5, prefill_done_overhead_s=0.002)
    a, b = SimRequest(0.0, 100, 1), SimRequest(0.0005, 100, 1)
    Simulation(spec).run([a, b])
    step = 0.01 + 100 * 1e-4 + 100 * 1e-5 + 0.002
    assert abs(a.ttft_s - step) < 1e-9
    assert abs(b.first_token_s - 2 * step) < 1e-9  # b queued behind a's longer step


def test_shared_cores_slow_concurrent_instances():
    def ttft(cores: float | None) -> float:
        spec = ClusterSpec([Instance("prefill", LM), Instance("decode", LM)], link_bps=lambda a, b: 1e12,
                           cores=cores)
        long_decode = SimRequest(0.0, 10, 400)  # keeps the decode instance busy
        late = SimRequest(0.5, 100, 1)
        Simulation(spec).run([long_decode, late])
        return late.ttft_s

    assert abs(ttft(None) - (0.01 + 100 * 1e-4)) < 1e-9
    assert abs(ttft(2.0) - ttft(None)) < 1e-9  # two instances, two cores
    assert abs(ttft(1.0) - 2 * ttft(None)) < 1e-9  # two busy instances on one core


def test_host_cores_take_their_share_of_the_shared_cores():
    """The serving stack's own CPU (host_cores) counts as busy instances do: two busy
    workers and half a core of ingress on two cores run 1.25x longer; alone, a worker still
    has a core to itself."""
    def ttft(host: float, busy_neighbour: bool) -> float:
        spec = ClusterSpec([Instance("prefill", LM), Instance("decode", LM)], link_bps=lambda a, b: 1e12,
                           cores=2.0, host_cores=host)
        reqs = [SimRequest(0.0, 10, 400)] if busy_neighbour else []  # keeps the decode instance busy
        late = SimRequest(0.5, 100, 1)
        Simulation(spec).run(reqs + [late])
        return late.ttft_s

    alone = 0.01 + 100 * 1e-4
    assert abs(ttft(0.5, False) - alone) < 1e-9
    assert abs(ttft(0.5, True) - 1.25 * alone) < 1e-9
    assert abs(ttft(0.0, True) - alone) < 1e-9


def test_shared_slowdown_per_kind():
    """A prefill step that starts beside a busy decode instance runs 1.8x longer; the
    decode instance's own steps 1.2x (it is busy whenever the prefill is, here)."""
    def run(slow: dict[str, float] | None) -> tuple[SimRequest, SimRequest, float]:
        spec = ClusterSpec([Instance("prefill", LM), Instance("decode", LM)], link_bps=lambda a, b: 1e12,
                           shared_slowdown=slow)
        long_decode = SimRequest(0.0, 10, 400)
        late = SimRequest(0.5, 100, 1)
        Simulation(spec).run([long_decode, late])
        return long_decode, late, spec.instances[1].busy_s

    d0, late0, busy0 = run(None)
    d1, late1, busy1 = run({"prefill": 1.8, "decode": 1.2})
    assert abs(late1.ttft_s - 1.8 * late0.ttft_s) < 1e-9
    # Decode steps slow only while the prefill instance is busy (one short window).
    assert busy0 < busy1 < 1.2 * busy0
    assert run({"decode": 1.2})[1].ttft_s == late0.ttft_s  # kinds not named run at full speed


def test_busy_time_is_tracked_per_instance():
    spec = ClusterSpec([Instance("prefill", LM), Instance("decode", LM)], link_bps=lambda a, b: 1e12)
    Simulation(spec).run([SimRequest(0.0, 100, 5)])
    p, d = spec.instances
    assert abs(p.busy_s - (0.01 + 100 * 1e-4)) < 1e-9
    assert abs(d.busy_s - 4 * (0.005 + 1e-3)) < 1e-9
    slow = LM.scaled(2.0)
    assert abs(slow.decode_s(3, 100) - 2 * LM.decode_s(3, 100)) < 1e-12
