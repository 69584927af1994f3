"""Expert-placement benchmark (issue 5): the ILP against the EPLB greedy on skewed,
layer-correlated synthetic routing traces (``placement.traces.synthetic_trace``).

Cases:
- ``issue``: 64 experts, 16 GPUs on 2 nodes, 16 layers, top-2, 5 slots per GPU. Targets:
  every placement valid; ILP's most loaded GPU within 3% of the LP lower bound (total load
  / GPUs) in every layer; cross-node traffic >= 20% below the greedy's at equal or better
  balance; solve time <= 60 s.
- ``deepseek``: DeepSeek-V3's shape, 256 experts, 64 GPUs on 8 nodes, 58 layers, top-8,
  5 slots per GPU. Target: solves within 5 minutes.
- ``drift`` (with ``issue``'s shape): the routing of half the layers changes; the
  warm-started ``resolve`` against a fresh solve: balance, traffic and replicas moved.

    python -m benchmarks.expert_placement_bench --json [--case issue|deepseek|drift|all]

Times are wall clock on this machine (2 shared cores), trace statistics excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from placement.expert_ilp import IlpOptions
from placement.experts import ExpertPlacement, TraceStats, evaluate, place_experts, resolve
from placement.traces import synthetic_trace


@dataclass(frozen=True)
class Case:
    name: str
    experts: int
    gpus: int
    gpus_per_node: int
    layers: int
    top_k: int
    slots: int
    time_limit_s: float
    target_s: float


CASES = {
    "issue": Case("issue", 64, 16, 8, 16, 2, 5, 60.0, 60.0),
    "deepseek": Case("deepseek", 256, 64, 8, 58, 8, 5, 270.0, 300.0),
}


def _metrics(p: ExpertPlacement, stats: TraceStats) -> dict[str, Any]:
    m = evaluate(p, stats)
    u = evaluate(p, stats, routing="uniform")
    s = m.summary
    return {
        "valid": m.valid,
        "balance_mean": round(s["balance_mean"], 4),  # max GPU load / LP bound, mean over layers
        "balance_worst": round(s["balance_worst"], 4),
        "cross_node_fraction": round(s["cross_node_fraction"], 4),  # of all dispatches, nearest replica
        "cross_gpu_fraction": round(s["cross_gpu_fraction"], 4),
        "link_cost": round(s["link_cost"], 1),
        "cross_node_fraction_uniform_routing": round(u.summary["cross_node_fraction"], 4),
        "max_load": m.max_load,
    }


def run_case(case: Case, tokens: int, skew: float, correlation: float, seed: int, time_limit_s: float | None) -> dict:
    trace = synthetic_trace(tokens, case.layers, case.experts, case.top_k, skew, correlation, seed=seed)
    stats = TraceStats.from_trace(trace, case.experts)
    t0 = time.monotonic()
    greedy = place_experts(stats, case.gpus, case.gpus_per_node, case.slots, "eplb")
    greedy_s = time.monotonic() - t0
    limit = time_limit_s or case.time_limit_s
    t0 = time.monotonic()
    ilp = place_experts(stats, case.gpus, case.gpus_per_node, case.slots, "ilp", time_limit_s=limit)
    ilp_s = time.monotonic() - t0
    mi, mg = _metrics(ilp, stats), _metrics(greedy, stats)
    lb = np.array(evaluate(ilp, stats).lower_bound)
    within = float((np.array(mi.pop("max_load")) / lb).max())
    greedy_max = np.array(mg.pop("max_load"))
    ilp_max = np.array(evaluate(ilp, stats).max_load)
    cn_ratio = mi["cross_node_fraction"] / max(mg["cross_node_fraction"], 1e-12)
    assert ilp.report is not None
    return {
        "case": case.name,
        "shape": {
            "experts": case.experts, "gpus": case.gpus, "gpus_per_node": case.gpus_per_node, "layers": case.layers,
            "top_k": case.top_k, "slots": case.slots, "tokens": tokens, "skew": skew, "correlation": correlation,
            "seed": seed, "time_limit_s": limit,
        },
        "ilp": {**mi, "solve_s": round(ilp_s, 1)},
        "eplb": {**mg, "solve_s": round(greedy_s, 2)},
        "solver": {k: v for k, v in ilp.report.as_dict().items() if not isinstance(v, list)},
        "ilp_vs_eplb": {
            "cross_node_ratio": round(cn_ratio, 4),
            "cross_node_reduction": round(1.0 - cn_ratio, 4),
            "cross_gpu_ratio": round(mi["cross_gpu_fraction"] / max(mg["cross_gpu_fraction"], 1e-12), 4),
            "layers_with_higher_max_load": int((ilp_max > greedy_max + 1e-9).sum()),
        },
        "targets": {
            "valid": mi["valid"] and mg["valid"],
            "ilp_max_load_within_3pct_of_lp_bound": within <= 1.03,
            "ilp_worst_max_load_over_lp_bound": round(within, 4),
            "cross_node_at_least_20pct_below_greedy": cn_ratio <= 0.8,
            "balance_equal_or_better": mi["balance_worst"] <= mg["balance_worst"]
            and mi["balance_mean"] <= mg["balance_mean"],
            "solve_time_within_target": ilp_s <= case.target_s,
            "target_s": case.target_s,
        },
    }


def run_drift(tokens: int, skew: float, correlation: float, seed: int) -> dict:
    case = CASES["issue"]
    shape = (case.gpus, case.gpus_per_node, case.slots)
    old = synthetic_trace(tokens, case.layers, case.experts, case.top_k, skew, correlation, seed=seed)
    new = old.copy()
    half = case.layers // 2
    new[:, :half] = synthetic_trace(tokens, half, case.experts, case.top_k, skew, correlation, seed=seed + 1000)
    old_stats, new_stats = TraceStats.from_trace(old, case.experts), TraceStats.from_trace(new, case.experts)
    first = place_experts(old_stats, *shape, "ilp", time_limit_s=case.time_limit_s)
    t0 = time.monotonic()
    again = resolve(first, new_stats, drift_tolerance=0.03, time_limit_s=case.time_limit_s, migration_cost=1.0)
    resolve_s = time.monotonic() - t0
    t0 = time.monotonic()
    fresh = place_experts(new_stats, *shape, "ilp", time_limit_s=case.time_limit_s)
    fresh_s = time.monotonic() - t0
    total = int(first.counts.sum())

    def moved(p: ExpertPlacement) -> int:
        return int(np.maximum(p.counts - first.counts, 0).sum())

    def brief(p: ExpertPlacement, seconds: float) -> dict:
        s = evaluate(p, new_stats).summary
        return {
            "balance_mean": round(s["balance_mean"], 4), "balance_worst": round(s["balance_worst"], 4),
            "cross_node_fraction": round(s["cross_node_fraction"], 4), "replicas_moved": moved(p),
            "replicas_total": total, "solve_s": round(seconds, 1),
        }

    assert again.report is not None
    return {
        "case": "drift",
        "changed_layers": half,
        "stale": brief(first, 0.0),
        "resolve": {**brief(again, resolve_s), "layers_resolved": again.report.layers_solved},
        "fresh": brief(fresh, fresh_s),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=["issue", "deepseek", "drift", "all"], default="all")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--skew", type=float, default=0.6, help="Zipf exponent of expert popularity")
    ap.add_argument("--correlation", type=float, default=0.7, help="share of routing that follows the previous layer")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=None, help="override the case's ILP time limit (s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    names = ["issue", "deepseek", "drift"] if args.case == "all" else [args.case]
    results = []
    for name in names:
        if name == "drift":
            results.append(run_drift(args.tokens, args.skew, args.correlation, args.seed))
        else:
            results.append(run_case(CASES[name], args.tokens, args.skew, args.correlation, args.seed, args.time_limit))
        if not args.json:
            print(json.dumps(results[-1], indent=1))
    if args.json:
        print(json.dumps({"benchmark": "expert_placement", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
