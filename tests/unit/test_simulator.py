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
