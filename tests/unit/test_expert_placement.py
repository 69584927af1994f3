"""Expert placement: trace statistics, synthetic traces, the EPLB greedy, the ILP, the
re-solve, metrics, bad input and the place-experts CLI. Small instances only (seconds);
the issue's 64- and 256-expert cases are in benchmarks/expert_placement_bench.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from placement.eplb import eplb
from placement.errors import PlacementInputError
from placement.expert_ilp import IlpOptions
from placement.expert_metrics import check_placement, counts_from_lists, gpu_loads, placement_metrics
from placement.experts import (
    ExpertPlacement,
    TraceStats,
    evaluate,
    main,
    place_experts,
    read_placement,
    resolve,
)
from placement.traces import coactivation, expert_loads, synthetic_trace, validate_trace


GPUS, PER_NODE, SLOTS, EXPERTS = 8, 4, 3, 16


def small_trace(seed: int = 0, layers: int = 4, skew: float = 0.8, correlation: float = 0.8) -> np.ndarray:
    return synthetic_trace(3000, layers, EXPERTS, 2, skew=skew, correlation=correlation, seed=seed)


@pytest.fixture(scope="module")
def stats() -> TraceStats:
    return TraceStats.from_trace(small_trace(), EXPERTS)


@pytest.fixture(scope="module")
def ilp(stats: TraceStats) -> ExpertPlacement:
    return place_experts(stats, GPUS, PER_NODE, SLOTS, "ilp", time_limit_s=20)


@pytest.fixture(scope="module")
def greedy(stats: TraceStats) -> ExpertPlacement:
    return place_experts(stats, GPUS, PER_NODE, SLOTS, "eplb")


# --- statistics and traces -------------------------------------------------------------

def test_loads_and_coactivation_count_tokens() -> None:
    trace = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]]])  # 2 tokens, 2 layers, top-2
    assert expert_loads(trace, 4).tolist() == [[2, 1, 1, 0], [0, 1, 2, 1]]
    co = coactivation(trace, 4)
    assert co.shape == (1, 4, 4)
    assert co[0, 0, 2] == 2 and co[0, 0, 3] == 1 and co[0, 0, 1] == 1 and co[0, 1, 2] == 1 and co[0, 2, 1] == 1
    assert co.sum() == 2 * 2 * 2


def test_synthetic_trace_is_valid_seeded_skewed_and_correlated() -> None:
    a = small_trace(seed=3)
    assert a.shape == (3000, 4, 2) and np.issubdtype(a.dtype, np.integer)
    assert np.array_equal(a, small_trace(seed=3)) and not np.array_equal(a, small_trace(seed=4))
    ids, n = validate_trace(a, EXPERTS)  # distinct ids per token and layer, in range
    loads = expert_loads(ids, n)
    assert (loads.max(axis=1) / loads.mean(axis=1)).min() > 1.5  # skewed

    def concentration(trace: np.ndarray) -> float:  # share of each expert's successors in its top 3
        co = coactivation(trace, EXPERTS).astype(float)
        top = np.sort(co, axis=2)[:, :, -3:].sum(axis=2)
        return float(top.sum() / co.sum())

    assert concentration(a) > concentration(small_trace(seed=3, correlation=0.0)) + 0.1


# --- validity, balance, traffic --------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["ilp", "eplb"])
def test_placements_are_valid_on_random_traces(method: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    trace = np.stack([rng.permutation(12)[:3] for _ in range(300 * 3)]).reshape(300, 3, 3)
    p = place_experts(trace, 6, 3, 3, method, time_limit_s=5, experts=12)
    m = evaluate(p, trace)
    assert m.valid, m.problems
    assert all(len(ids) <= 3 for layer in p.layers for ids in layer)
    assert all(set().union(*map(set, layer)) == set(range(12)) for layer in p.layers)


def test_ilp_balances_at_least_as_well_as_greedy(
    stats: TraceStats, ilp: ExpertPlacement, greedy: ExpertPlacement
) -> None:
    mi, mg = evaluate(ilp, stats), evaluate(greedy, stats)
    assert mi.valid and mg.valid
    assert all(a <= b + 1e-9 for a, b in zip(mi.max_load, mg.max_load))
    r = ilp.report
    assert r is not None
    assert all(a <= c + 1e-9 for a, c in zip(mi.max_load, r.cap))  # stage 2 stays under its cap
    assert all(c <= 1.02 * s1 + 1e-9 for c, s1 in zip(r.cap, r.stage1_max_load))  # = tolerance x stage 1
    assert all(s1 <= 1.06 * lb for s1, lb in zip(r.stage1_max_load, r.lower_bound))


def test_ilp_cuts_cross_node_traffic_on_correlated_trace(
    stats: TraceStats, ilp: ExpertPlacement, greedy: ExpertPlacement
) -> None:
    mi, mg = evaluate(ilp, stats), evaluate(greedy, stats)
    assert mi.summary["cross_node"] <= 0.9 * mg.summary["cross_node"]
    assert mi.summary["link_cost"] < mg.summary["link_cost"]
    assert ilp.report is not None and ilp.report.traffic_cost <= ilp.report.traffic_cost_start


def test_time_limit_returns_best_feasible_with_gap(stats: TraceStats) -> None:
    opts = IlpOptions(flat_limit=0)  # hierarchical path, too little time to finish
    p = place_experts(stats, GPUS, PER_NODE, SLOTS, "ilp", time_limit_s=0.2, options=opts)
    assert evaluate(p, stats).valid
    assert p.report is not None and p.report.time_limited
    assert p.report.stage1_gap >= 0


def test_hierarchical_and_single_node_paths(stats: TraceStats) -> None:
    hier = place_experts(stats, GPUS, PER_NODE, SLOTS, "ilp", time_limit_s=3, options=IlpOptions(flat_limit=0))
    assert evaluate(hier, stats).valid
    one = place_experts(stats, GPUS, GPUS, SLOTS, "ilp", time_limit_s=3)
    m = evaluate(one, stats)
    assert m.valid and m.summary["cross_node"] == 0


def test_metrics_on_a_hand_made_placement() -> None:
    # 2 experts, 2 GPUs on 2 nodes; layer 0: e0 on gpu0, e1 on gpu1; layer 1 swapped.
    layers = [[[0], [1]], [[1], [0]]]
    counts = counts_from_lists(layers, 2)
    trace = np.array([[[0], [0]], [[1], [1]], [[0], [1]]])  # top-1; token 2 goes 0 -> 1
    s = TraceStats.from_trace(trace)
    m = placement_metrics(counts, s.loads, s.coact, 1, 1, 1)
    assert m.valid
    assert m.cross_node == [2.0]  # 0->0 and 1->1 cross nodes; 0->1 stays on gpu0
    assert m.cross_gpu == [2.0]
    assert m.max_load == [2.0, 2.0] and m.lower_bound == [1.5, 1.5]
    shared = counts_from_lists([[[0, 1], [1]], [[0], [1]]], 2)  # e1 replicated in layer 0
    assert gpu_loads(shared[0], s.loads[0].astype(float)).tolist() == [2.5, 0.5]
    # half of e1's tokens sit on gpu0 and cross to e1 on gpu1; 0 -> 1 crosses
    assert placement_metrics(shared, s.loads, s.coact, 1, 1, 2).cross_node == [1.5]
    shared = counts_from_lists([[[0], [1]], [[0, 1], [1]]], 2)  # e1 replicated in layer 1
    nearest = placement_metrics(shared, s.loads, s.coact, 1, 1, 2)
    uniform = placement_metrics(shared, s.loads, s.coact, 1, 1, 2, routing="uniform")
    assert nearest.cross_node == [0.0] and uniform.cross_node == [1.0]
    assert check_placement([[[0, 0, 1], []]], 2, 1, 2, 2) == ["layers[0][0]: holds 3 experts, more than slots=2"]
    assert "on no GPU" in check_placement([[[0], []]], 2, 1, 2, 2)[0]


def test_resolve_replaces_only_drifted_layers(ilp: ExpertPlacement) -> None:
    new = small_trace(seed=9)
    new[:, 1:] = small_trace(seed=0)[:, 1:]  # only layer 0 changes its routing
    stats = TraceStats.from_trace(new, EXPERTS)
    again = resolve(ilp, stats, drift_tolerance=0.03, time_limit_s=10)
    assert evaluate(again, stats).valid
    before = gpu_loads(ilp.counts[0], stats.loads[0].astype(float)).max()
    after = gpu_loads(again.counts[0], stats.loads[0].astype(float)).max()
    assert after < before
    assert np.array_equal(again.counts[2:], ilp.counts[2:])  # not drifted, not touched
    assert again.report is not None and 0 < again.report.moved_replicas < GPUS * SLOTS
    same = resolve(ilp, TraceStats.from_trace(small_trace(), EXPERTS), drift_tolerance=0.5)
    assert np.array_equal(same.counts, ilp.counts)


def test_eplb_baseline_matches_deepseek_structure() -> None:
    loads = np.array([[100, 10, 10, 10, 10, 10, 10, 40]])
    counts = eplb(loads, 4, 2, 3)[0]  # 2 nodes x 2 GPUs x 3 slots = 12 replicas
    assert counts.sum() == 12 and (counts.sum(axis=0) == 3).all()
    nodes = counts.reshape(8, 2, 2).sum(axis=2)
    assert ((nodes > 0).sum(axis=1) == 1).all()  # hierarchical: an expert's replicas stay on one node
    assert counts[0].sum() >= counts[7].sum() >= 1


# --- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("trace", "kwargs", "field", "words"),
    [
        (np.zeros((10, 2, 2)), {}, "trace", "dtype float64"),
        (np.zeros((10, 2), dtype=np.int64), {}, "trace", "[tokens, layers, top_k]"),
        (np.zeros((0, 2, 1), dtype=np.int64), {}, "trace", "at least 1"),
        (np.array([[[0, -1]]]), {}, "trace", "negative"),
        (np.array([[[0, 16]]]), {"experts": 16}, "trace", "[0, 15]"),
        (np.array([[[3, 3]]]), {}, "trace", "distinct"),
        (np.array([[[0, 1]]], dtype=bool), {}, "trace", "dtype bool"),
        ("not an array", {}, "trace", "numpy array"),
        (np.array([[[0, 1]]]), {"experts": 0}, "experts", "positive"),
        (np.array([[[0, 1]]]), {"experts": 70}, "slots", "fewer than the 70 experts"),
        (np.array([[[0, 1]]]), {"gpus": 6}, "gpus_per_node", "multiple"),
        (np.array([[[0, 1]]]), {"gpus": 0}, "gpus", "positive"),
        (np.array([[[0, 1]]]), {"slots": -1}, "slots", "positive"),
        (np.array([[[0, 1]]]), {"method": "random"}, "method", "ilp, eplb"),
        (np.array([[[0, 1]]]), {"time_limit_s": 0}, "time_limit", "positive"),
    ],
)
def test_bad_input_names_the_field(trace: object, kwargs: dict, field: str, words: str) -> None:
    args = {"gpus": GPUS, "gpus_per_node": PER_NODE, "slots": SLOTS, **kwargs}
    with pytest.raises(PlacementInputError) as info:
        place_experts(trace, **args)
    assert info.value.field == field
    assert words in str(info.value)


# --- CLI -------------------------------------------------------------------------------

def _cli(tmp_path: Path, trace: object, *extra: str) -> tuple[int, Path]:
    path = tmp_path / "trace.npy"
    np.save(path, trace)
    out = tmp_path / "out" / "PLACEMENT.json"
    args = ["--trace", str(path), "--gpus", str(GPUS), "--gpus-per-node", str(PER_NODE), "--out", str(out)]
    if not any(a == "--slots" for a in extra):
        args += ["--slots", str(SLOTS)]
    return main(args + list(extra)), out


@pytest.mark.parametrize("method", ["ilp", "eplb"])
def test_cli_writes_the_design_format(tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str) -> None:
    trace = small_trace(layers=3)
    code, out = _cli(tmp_path, trace, "--method", method, "--time-limit", "10", "--experts", "16")
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads(out.read_text())
    layers = data["layers"]
    assert len(layers) == 3 and all(len(layer) == GPUS for layer in layers)
    assert check_placement(layers, EXPERTS, 3, GPUS, SLOTS) == []
    assert data["method"] == method and data["metrics"]["valid"]
    assert ("solver" in data) == (method == "ilp")
    assert np.array_equal(read_placement(out).counts, counts_from_lists(layers, EXPERTS))


@pytest.mark.parametrize(
    ("trace", "extra", "message"),
    [
        (np.zeros((10, 2, 2)), (), "--trace"),
        (np.array([[[0, 20]]]), ("--experts", "16"), "[0, 15]"),
        (np.array([[[0, 1]]]), ("--slots", "1", "--experts", "16"), "--slots: slots x gpus = 1 x 8 = 8"),
    ],
)
def test_cli_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trace: object, extra: tuple[str, ...], message: str
) -> None:
    code, out = _cli(tmp_path, trace, *extra)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_register_adds_the_subcommand(tmp_path: Path) -> None:
    import argparse

    from placement.experts import register

    parser = argparse.ArgumentParser(prog="splitserve")
    register(parser.add_subparsers(dest="command", required=True))
    path = tmp_path / "t.npy"
    np.save(path, small_trace(layers=2))
    out = tmp_path / "p.json"
    args = parser.parse_args(["place-experts", "--trace", str(path), "--gpus", "8", "--gpus-per-node", "4",
                              "--slots", "3", "--method", "eplb", "--out", str(out)])
    assert args.func(args) == 0 and out.exists()


def test_cli_unreadable_or_missing_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    for path in (bad, tmp_path / "missing.npy"):
        code = main(["--trace", str(path), "--gpus", "8", "--gpus-per-node", "4", "--slots", "3", "--out",
                     str(tmp_path / "p.json")])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("place-experts: --trace") and str(path) in err
    assert main(["--trace", str(bad), "--gpus", "x", "--gpus-per-node", "4", "--slots", "3", "--out", "p"]) == 2
    assert main(["--trace", str(bad), "--gpus", "8", "--gpus-per-node", "3", "--slots", "3", "--out", "p"]) == 2


# --- the issue's case (slow; the figures and times come from the benchmark script) -----

def test_issue_shape_meets_the_3pct_target_on_two_layers() -> None:
    """The issue's shape (64 experts, 16 GPUs of 8 per node, top-2, 5 slots) on 2 of its 16
    layers (layers are placed independently), so the 3%-of-the-LP-bound target runs in the
    default suite (seconds); the 16-layer case stays under -m slow. The time limit is far
    above the few seconds these take, so the result does not follow the machine's load."""
    import dataclasses

    from benchmarks.expert_placement_bench import CASES, run_case

    case = dataclasses.replace(CASES["issue"], layers=2)
    t = run_case(case, 8192, 0.6, 0.7, 1, 120.0)["targets"]
    assert t["valid"]
    assert t["ilp_max_load_within_3pct_of_lp_bound"], t["ilp_worst_max_load_over_lp_bound"]
    assert t["cross_node_at_least_20pct_below_greedy"]
    assert t["balance_equal_or_better"]


@pytest.mark.slow
def test_issue_case_meets_quality_targets() -> None:
    from benchmarks.expert_placement_bench import CASES, run_case

    r = run_case(CASES["issue"], 8192, 0.6, 0.7, 1, None)
    t = r["targets"]
    assert t["valid"]
    assert t["ilp_max_load_within_3pct_of_lp_bound"]
    assert t["cross_node_at_least_20pct_below_greedy"]
    assert t["balance_equal_or_better"]
