from placement.catalogue import gpu, opt
import pytest

from placement.search import CHUNKED_BUDGET, SLO, WHOLE_BUDGET, Workload, best_of_kind, parallel_options, search


def test_parallel_options_respect_memory():
    # OPT-66B (132 GB fp16) cannot fit one 80 GB A100; 2+ GPUs can.
    opts = parallel_options(opt("66b"), gpu("a100-80g"), 8)
    assert (1, 1) not in opts and (2, 1) in opts and (8, 1) in opts


def test_search_returns_sorted_layouts_of_both_kinds():
    lays = search(opt("13b"), gpu("a100-80g"), 4, SLO(0.5, 0.1),
                  Workload((64, 512), (16, 128), num_requests=120))
    kinds = {lay.mode for lay in lays}
    assert kinds == {"colocated", "disaggregated"}
    per_gpu = [lay.goodput_per_gpu for lay in lays]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[0] > 0
    for lay in lays:
        assert lay.gpus <= 4


def test_colocated_offered_three_ways_and_labelled():
    lays = search(opt("13b"), gpu("a100-80g"), 4, SLO(0.5, 0.1),
                  Workload((64, 512), (16, 128), num_requests=120, max_requests=600))
    kinds = {lay.kind for lay in lays}
    assert {"colocated/chunked", "colocated/whole", "colocated/prefill-first", "disaggregated"} <= kinds
    best = best_of_kind(lays)
    # Same budget and instances; the only difference is that prompts get steps of their
    # own and decodes wait, which can only cost goodput.
    assert best["colocated/prefill-first"].goodput_per_gpu <= best["colocated/whole"].goodput_per_gpu * 1.05
    for lay in lays:
        if lay.mode == "colocated":
            budget = lay.pools["colocated"]["max_num_batched_tokens"]
            assert budget == (CHUNKED_BUDGET if lay.kind == "colocated/chunked" else WHOLE_BUDGET)
        else:  # prefill and decode may differ in parallelism; no instance spans a node
            assert set(lay.pools) == {"prefill", "decode"}


def test_search_prunes_pairs_by_bound_and_is_fast_on_16_gpus():
    """Fast is counted in simulations (what the search's time goes to), not wall-clock
    seconds on a shared machine; benchmarks/plan_search.py times it."""
    st: dict = {}
    lays = search(opt("13b"), gpu("a100-80g"), 16, SLO(0.25, 0.1),
                  Workload((64, 512), (16, 128), num_requests=120, max_requests=600), stats=st)
    assert st["pairs_pruned"] > 0 and st["units_verified"] >= 1
    assert st["pairs_pruned"] + st["units_verified"] <= st["pairs"]
    # 109 simulations when written (16 pairs, 9 pruned by the bound, 3 verified); without
    # the bound every pair would be simulated.
    assert st["simulations"] <= 150, st
    assert lays[0].gpus <= 16 and lays[0].goodput_per_gpu > 0


def test_place_units_keeps_instances_inside_nodes():
    from placement.search import place_units

    placed = place_units([2, 2, 4], 3, 8, 3)
    assert placed is not None
    used = {}
    for unit in placed:
        for g, n in zip([2, 2, 4], unit):
            used[n] = used.get(n, 0) + g
    assert all(v <= 8 for v in used.values())
    assert all(len(set(u)) == 1 for u in placed)  # each unit fits one node here
    assert place_units([8, 8], 2, 8, 3) is None


@pytest.mark.slow
def test_64_gpu_search_under_a_minute():
    """8 nodes x 8 A100: OPT-66B and a Mixtral-8x7B-shaped MoE (benchmarks/plan_search.py)."""
    from benchmarks.plan_search import run_64

    for name, seconds, lay in run_64():
        assert seconds < 60, (name, seconds)
        assert lay.goodput_per_gpu > 0 and lay.gpus <= 64


def test_moe_attention_expert_decode_is_scored_as_its_own_kind():
    from benchmarks.plan_search import MIXTRAL_8X7B
    from placement.attention_expert import ae_options, ae_roofline

    g = gpu("a100-80g")
    # Ping-pong: two micro-batches overlap the pools, so a step costs less than running
    # the same work through attention, hops and experts one after another.
    ae = ae_roofline(MIXTRAL_8X7B, g, 2, 4)
    ta, te, tc = ae.stage_times(128, 128 * 600)
    assert ae.step_s(128, 128 * 600) < 2 * MIXTRAL_8X7B.num_layers * (ta + te + 2 * tc)
    # More expert workers hold fewer experts each: the expert stage gets cheaper.
    assert ae_roofline(MIXTRAL_8X7B, g, 2, 8).stage_times(128, 0)[1] < te
    opts = ae_options(MIXTRAL_8X7B, g, 8, 1536)
    assert opts and all(na + ne <= 8 for _, na, ne in opts)
    lays = search(MIXTRAL_8X7B, g, 8, SLO(2.5, 0.15),
                  Workload((64, 512), (16, 128), num_requests=120, max_requests=600), attention_expert=True)
    ae_lays = [lay for lay in lays if lay.kind == "disaggregated/ae"]
    assert ae_lays and ae_lays[0].goodput_rps > 0
    d = ae_lays[0].pools["decode"]
    assert d["gpus"] == d["attention_workers"] + d["expert_workers"]
    assert ae_lays[0].gpus <= 8
    # Dense models have no such layouts.
    assert not ae_options(opt("13b"), g, 8, 1536)
