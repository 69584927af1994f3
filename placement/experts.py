"""Expert placement for mixture-of-experts serving: the ``place-experts`` command and its
Python interface.

    place-experts --trace TRACE.npy --gpus G --gpus-per-node K --slots S
                  [--method ilp|eplb] [--time-limit SECONDS] [--experts E] --out PLACEMENT.json
    splitserve place-experts --from URL [--gpus G] --gpus-per-node K --slots S ... --out PLACEMENT.json

``--from URL`` reads a running deployment's live expert load from its ``/metrics``
(token choices routed per layer and expert, cluster.expert_stats) instead of a trace;
``splitserve apply`` with the manifest's ``pools.expert.placement`` pointing at the
written file re-places the experts live.

TRACE is an integer array ``[tokens, layers, top_k]`` of routed expert ids
(``placement.traces``; the number of experts is ``--experts``, else max id + 1).
PLACEMENT.json holds ``"layers"``: for each layer, for each GPU, the expert ids it holds;
every expert of every layer is on at least one GPU and no GPU holds more than S. Beside
it: the shape (``experts``, ``gpus``, ``gpus_per_node``, ``slots``), the ``method``, the
placement's ``metrics`` on the trace and, for the ILP, the ``solver`` report (time, gaps,
whether a time limit was hit).

Methods: ``ilp`` (``placement.expert_ilp``: balance, then cross-layer traffic, after
MoETuner) and ``eplb`` (``placement.eplb``: DeepSeek's greedy). ``resolve`` re-places
only the layers whose balance drifted on a new trace, keeping replicas where they were
when that costs little. Bad input raises ``PlacementInputError`` (the CLI exits 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from placement.eplb import eplb
from placement.errors import PlacementInputError
from placement.expert_ilp import IlpOptions, SolveReport, solve_ilp
from placement.expert_metrics import (
    PlacementMetrics,
    check_placement,
    counts_from_lists,
    gpu_loads,
    lists_from_counts,
    placement_metrics,
)
from placement.traces import coactivation, expert_loads, load_trace, validate_trace

log = logging.getLogger(__name__)

METHODS = ("ilp", "eplb")


@dataclass(frozen=True)
class TraceStats:
    loads: np.ndarray  # [layers, experts] token counts
    coact: np.ndarray  # [layers - 1, experts, experts] pair counts between consecutive layers
    top_k: int
    experts: int

    @classmethod
    def from_loads(cls, loads: np.ndarray, top_k: int) -> TraceStats:
        """Token counts alone (a live server's /metrics): no co-activations, so the ILP
        balances load and its traffic term is zero."""
        loads = np.asarray(loads, dtype=np.int64)
        if loads.ndim != 2 or loads.shape[1] < 1 or (loads < 0).any():
            raise PlacementInputError("from", f"loads of shape {list(loads.shape)}: expected [layers, experts] "
                                      "non-negative counts")
        top_k = _positive_int("top_k", top_k)
        e = loads.shape[1]
        return cls(loads, np.zeros((max(0, loads.shape[0] - 1), e, e), dtype=np.int64), top_k, e)

    @classmethod
    def from_trace(cls, trace: object, experts: int | None = None) -> TraceStats:
        ids, num = validate_trace(trace, experts)
        return cls(expert_loads(ids, num), coactivation(ids, num), ids.shape[2], num)


@dataclass
class ExpertPlacement:
    counts: np.ndarray  # [layers, experts, gpus] replicas of each expert on each GPU
    gpus_per_node: int
    slots: int
    method: str
    report: SolveReport | None = None  # ILP only

    @property
    def layers(self) -> list[list[list[int]]]:
        """PLACEMENT.json's ``layers``: per layer, per GPU, the expert ids held."""
        return lists_from_counts(self.counts)

    @property
    def experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def gpus(self) -> int:
        return int(self.counts.shape[2])

    def to_json(self, metrics: PlacementMetrics | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "layers": self.layers,
            "experts": self.experts,
            "gpus": self.gpus,
            "gpus_per_node": self.gpus_per_node,
            "slots": self.slots,
            "method": self.method,
        }
        if metrics is not None:
            out["metrics"] = {
                **metrics.summary,
                "valid": metrics.valid,
                "max_load": metrics.max_load,
                "lower_bound": metrics.lower_bound,
            }
        if self.report is not None:
            out["solver"] = self.report.as_dict()
        return out


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlacementInputError(name, f"{value!r} is not allowed: must be a positive integer")
    return int(value)


def check_shape(experts: int, gpus: object, gpus_per_node: object, slots: object) -> None:
    """Raise PlacementInputError unless the cluster shape can hold ``experts`` experts."""
    gpus = _positive_int("gpus", gpus)
    gpus_per_node = _positive_int("gpus_per_node", gpus_per_node)
    slots = _positive_int("slots", slots)
    if gpus % gpus_per_node:
        raise PlacementInputError(
            "gpus_per_node", f"gpus={gpus} is not a multiple of gpus_per_node={gpus_per_node}: every node must "
            "have the same number of GPUs",
        )
    if slots * gpus < experts:
        raise PlacementInputError(
            "slots", f"slots x gpus = {slots} x {gpus} = {slots * gpus} is fewer than the {experts} experts: "
            f"every expert needs a slot; allowed: slots >= {math.ceil(experts / gpus)} for {gpus} GPUs",
        )


def place_experts(
    trace: object | TraceStats, gpus: int, gpus_per_node: int, slots: int, method: str = "ilp",
    time_limit_s: float = 60.0, experts: int | None = None, options: IlpOptions | None = None,
) -> ExpertPlacement:
    """Place the experts of every layer of ``trace`` (array or TraceStats) on ``gpus``."""
    stats = trace if isinstance(trace, TraceStats) else TraceStats.from_trace(trace, experts)
    check_shape(stats.experts, gpus, gpus_per_node, slots)
    if method not in METHODS:
        raise PlacementInputError("method", f"{method!r} is not allowed: expected one of {', '.join(METHODS)}")
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not (
        math.isfinite(time_limit_s) and time_limit_s > 0
    ):
        raise PlacementInputError(
            "time_limit", f"{time_limit_s!r} is not allowed: must be a positive number of seconds"
        )
    if method == "eplb":
        return ExpertPlacement(eplb(stats.loads, gpus, gpus_per_node, slots), gpus_per_node, slots, method)
    opts = replace(options or IlpOptions(), time_limit_s=float(time_limit_s))
    counts, report = solve_ilp(stats.loads, stats.coact, stats.top_k, gpus, gpus_per_node, slots, opts)
    return ExpertPlacement(counts, gpus_per_node, slots, method, report)


def resolve(
    previous: ExpertPlacement, new_trace: object | TraceStats, drift_tolerance: float = 0.03,
    time_limit_s: float = 60.0, migration_cost: float = 1.0, options: IlpOptions | None = None,
) -> ExpertPlacement:
    """Re-place, warm-started from ``previous``, the layers whose most loaded GPU on
    ``new_trace`` is more than ``drift_tolerance`` above the lower bound; other layers
    stay as they are. Moving a replica costs ``migration_cost`` mean replica loads."""
    stats = (
        new_trace if isinstance(new_trace, TraceStats) else TraceStats.from_trace(new_trace, previous.experts)
    )
    if stats.loads.shape != previous.counts.shape[:2]:
        raise PlacementInputError(
            "trace", f"[layers, experts] = {list(stats.loads.shape)} does not match the previous placement's "
            f"{list(previous.counts.shape[:2])}",
        )
    gpus, k, slots = previous.gpus, previous.gpus_per_node, previous.slots
    ratio = gpu_loads(previous.counts, stats.loads.astype(float)).max(axis=1) / (stats.loads.sum(axis=1) / gpus)
    drifted = [int(layer) for layer in np.flatnonzero(ratio > 1.0 + drift_tolerance)]
    log.info("re-solve: %d of %d layers drifted past %.1f%%", len(drifted), len(ratio), 100 * drift_tolerance)
    if not drifted:
        return ExpertPlacement(previous.counts.copy(), k, slots, "ilp", SolveReport())
    opts = replace(options or IlpOptions(), time_limit_s=float(time_limit_s), migration_cost=migration_cost)
    counts, report = solve_ilp(
        stats.loads, stats.coact, stats.top_k, gpus, k, slots, opts, start=previous.counts, layers_to_solve=drifted
    )
    return ExpertPlacement(counts, k, slots, "ilp", report)


def evaluate(placement: ExpertPlacement, trace: object | TraceStats, routing: str = "nearest") -> PlacementMetrics:
    """Balance, traffic and validity of ``placement`` on ``trace``."""
    stats = trace if isinstance(trace, TraceStats) else TraceStats.from_trace(trace, placement.experts)
    return placement_metrics(
        placement.counts, stats.loads, stats.coact, stats.top_k, placement.gpus_per_node, placement.slots, routing
    )


def read_placement(path: str | Path) -> ExpertPlacement:
    """Load a PLACEMENT.json written by ``place-experts``."""
    try:
        data = json.loads(Path(path).read_text())
        experts, slots, k = int(data["experts"]), int(data["slots"]), int(data["gpus_per_node"])
        layers = data["layers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlacementInputError("placement", f"{path}: not a placement file ({e})") from None
    gpus = len(layers[0]) if layers else 0
    problems = check_placement(layers, experts, len(layers), gpus, slots)
    if problems:
        raise PlacementInputError("placement", f"{path}: " + "; ".join(problems[:3]))
    return ExpertPlacement(counts_from_lists(layers, experts), k, slots, str(data.get("method", "ilp")))


def _summary_line(out: str, placement: ExpertPlacement, m: PlacementMetrics) -> str:
    s = m.summary
    line = (
        f"wrote {out}: {placement.method}, {len(m.max_load)} layers on {placement.gpus} GPUs; most loaded GPU "
        f"{s['balance_mean']:.3f}x the lower bound on average (worst layer {s['balance_worst']:.3f}x); "
        f"cross-node {100 * s['cross_node_fraction']:.1f}% and cross-GPU {100 * s['cross_gpu_fraction']:.1f}% "
        "of dispatches"
    )
    r = placement.report
    if r is not None:
        line += (
            f"; solved in {r.seconds:.1f}s, {r.sweeps} traffic sweeps"
            f"{' (time limit reached: best feasible placement found)' if r.time_limited else ''}; "
            f"max-load gap to the LP bound {100 * r.stage1_gap:.2f}% after balancing, traffic cut "
            f"{100 * (1 - r.traffic_cost / max(r.traffic_cost_start, 1e-12)):.1f}% by the ILP sweeps, "
            f"worst subproblem gap {100 * r.subproblem_gap:.2f}%"
        )
    return line


def _stats_from_url(args: argparse.Namespace) -> TraceStats | None:
    """The live statistics of the server at --from (None: reported, exit 2)."""
    fetch = getattr(args, "fetch_loads", None)
    if fetch is None:  # placement knows no HTTP: the splitserve CLI hands the reader in
        print("place-experts: --from needs the splitserve CLI (splitserve place-experts --from URL)", file=sys.stderr)
        return None
    try:
        loads, replicas = fetch(args.from_url)
    except Exception as e:  # noqa: BLE001 - cluster.expert_stats.ExpertStatsError and HTTP errors
        print(f"place-experts: --from {args.from_url}: {e}", file=sys.stderr)
        return None
    if args.gpus is None:
        if replicas is None:
            print(f"place-experts: --gpus: not given and {args.from_url} reports no expert pool size", file=sys.stderr)
            return None
        args.gpus = replicas
    if args.experts is not None and args.experts != loads.shape[1]:
        print(f"place-experts: --experts {args.experts}: the server routes over {loads.shape[1]} experts",
              file=sys.stderr)
        return None
    log.info("--from %s: %d routed token choices over %d layers x %d experts; %d expert workers", args.from_url,
             int(loads.sum()), loads.shape[0], loads.shape[1], args.gpus)
    return TraceStats.from_loads(loads, args.top_k)


def cmd_place_experts(args: argparse.Namespace) -> int:
    if (args.trace is None) == (getattr(args, "from_url", None) is None):
        print("place-experts: give exactly one of --trace TRACE.npy or --from URL (a running server)", file=sys.stderr)
        return 2
    if args.trace is not None and args.gpus is None:
        print("place-experts: --gpus: required with --trace", file=sys.stderr)
        return 2
    try:
        if args.trace is None:
            from_url = _stats_from_url(args)
            if from_url is None:
                return 2
            stats = from_url
        else:
            trace = load_trace(args.trace)
            stats = TraceStats.from_trace(trace, args.experts)
            if args.experts is None:
                log.info("--experts not given: %d experts (max id + 1) from %s", stats.experts, args.trace)
        placement = place_experts(
            stats, args.gpus, args.gpus_per_node, args.slots, args.method, args.time_limit, stats.experts
        )
    except PlacementInputError as e:
        flag = "--" + e.field.replace("_", "-")
        if e.field == "trace" and not e.detail.startswith(str(args.trace)):
            flag += f" {args.trace}"
        print(f"place-experts: {flag}: {e.detail}", file=sys.stderr)
        return 2
    metrics = evaluate(placement, stats)
    if not metrics.valid:  # a bug, never an input problem
        print("place-experts: internal error, invalid placement: " + "; ".join(metrics.problems), file=sys.stderr)
        return 1
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(placement.to_json(metrics)) + "\n")
    except OSError as e:
        print(f"place-experts: --out {out}: cannot write ({e})", file=sys.stderr)
        return 2
    print(_summary_line(str(out), placement, metrics))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, help="routing trace .npy, int array [tokens, layers, top_k]")
    p.add_argument("--from", dest="from_url", default=None, metavar="URL",
                   help="instead of --trace: a running attention/expert deployment (its /metrics: tokens routed "
                        "per layer and expert; no co-activations, so the ILP balances load only)")
    p.add_argument("--top-k", type=int, default=2, help="with --from: experts per token (default 2)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (expert workers) holding experts; with --from "
                   "default: the server's expert pool size")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (divides --gpus)")
    p.add_argument("--slots", type=int, required=True, help="expert slots per GPU per layer")
    p.add_argument("--method", choices=METHODS, default="ilp", help="ilp (default) or the eplb greedy")
    p.add_argument("--time-limit", type=float, default=60.0, help="ILP wall-clock limit, seconds (default 60)")
    p.add_argument("--experts", type=int, default=None, help="experts per layer (default: max id in the trace + 1)")
    p.add_argument("--out", required=True, help="PLACEMENT.json to write")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``place-experts`` to a CLI's subcommands."""
    p = subparsers.add_parser("place-experts", help="place MoE experts on GPUs from a routing trace")
    add_arguments(p)
    p.set_defaults(func=cmd_place_experts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="place-experts", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the problem
        return int(e.code) if isinstance(e.code, int) else 2
    return cmd_place_experts(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
