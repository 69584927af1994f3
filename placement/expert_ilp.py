"""Expert placement by integer programming, after MoETuner (2025, two ILPs): first
balance the load of every layer, then cut the tokens that cross GPUs and nodes between
consecutive layers without letting the most loaded GPU grow past a tolerance.

Stage 1 (``placement.expert_balance``): per layer, replication counts and a packing that
minimise the most loaded GPU; ``T1[l]`` is its max load.

Stage 2 (here): with the replication counts fixed, move replicas to cut the routed
traffic times link cost (same GPU 0, same node 1, other node ``node_cost``), subject to
every GPU's load <= ``cap[l] = min((1 + tolerance) * T1[l], max(T1[l], eplb[l]))`` (so
never worse balanced than the EPLB baseline either) and ``slots`` per GPU. The whole
problem couples every layer; it is decomposed into one MILP per layer with its
neighbours fixed, swept over the layers (coordinate descent). With layer ``l - 1`` and
``l + 1`` fixed the layer's part of the cost is linear:

- incoming: ``D[e, g]`` dispatches reach expert ``e`` from tokens on GPU ``g``; they cost
  ``node_cost - (node_cost - 1) * h[e, node(g)] - y[e, g]`` with ``y`` the placement
  (binary) and ``h[e, n] <= sum of y[e, g] on node n`` (the nearest replica);
- outgoing: a replica of ``e`` on ``g`` sends ``1 / r[e]`` of ``e``'s tokens on to the
  next layer at the (fixed) nearest-replica cost from ``g``.

Instances up to ``flat_limit`` expert-GPU pairs are solved flat; larger ones
hierarchically (DeepSeek's node-then-GPU split): a node-level MILP (replicas per node,
cross-node cost) and then one GPU-level MILP per node. Each MILP is warm-started from the
current placement, and a new layer placement is kept only if its exact cost is lower, so
a sweep never makes the placement worse; time limits return the best feasible placement
found, with the gaps in the report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from placement.eplb import eplb
from placement.expert_balance import balance_layer, improve_by_swaps, lpt_pack
from placement.expert_metrics import NODE_COST, gpu_loads, node_counts
from placement.milp import Milp, MilpResult

log = logging.getLogger(__name__)

# Hierarchical split: a node may hold up to K * (mean + room * (cap - mean)) load, trying
# these rooms in turn until every node's replicas pack onto its GPUs under the cap.
NODE_ROOM = (0.9, 0.6, 0.2)


@dataclass(frozen=True)
class IlpOptions:
    time_limit_s: float = 60.0  # wall clock for the whole solve
    tolerance: float = 0.02  # stage 2 may raise a layer's max load this much above stage 1's
    node_cost: float = NODE_COST  # cost of a cross-node dispatch (intra-node = 1)
    max_sweeps: int = 4  # stage-2 passes over the layers
    min_improvement: float = 0.005  # stop sweeping when a pass gains less (relative)
    flat_limit: int = 512  # experts * gpus up to which a layer is one flat MILP
    rel_gap: float = 0.005  # MILP relative gap at which a subproblem counts as solved
    gpu_level_time_s: float = 0.3  # hierarchical: time per node's GPU-level MILP (intra-node traffic)
    stage1_time_share: float = 0.1  # share of the time limit stage 1's MILP polish may use
    stage1_target_gap: float = 0.005  # stage 1 polishes a layer by MILP above this gap
    migration_cost: float = 0.0  # re-solve: cost of moving a replica, in mean replica loads


@dataclass
class SolveReport:
    seconds: float = 0.0
    stage1_max_load: list[float] = field(default_factory=list)  # per layer
    lower_bound: list[float] = field(default_factory=list)  # per layer, total load / GPUs
    cap: list[float] = field(default_factory=list)  # per layer, stage-2 load cap
    stage1_gap: float = 0.0  # worst (max load - lower bound) / max load after stage 1
    traffic_cost_start: float = 0.0  # link cost after stage 1
    traffic_cost: float = 0.0  # link cost of the result
    subproblem_gap: float = 0.0  # worst MILP gap among stage-2 subproblems of the last sweep
    sweeps: int = 0
    subproblems: int = 0
    time_limited: bool = False  # the whole solve stopped on its time limit before converging
    subproblems_time_limited: int = 0  # MILPs (stage 1 polish, stage 2) that stopped on their own limit
    fallbacks: int = 0  # subproblems whose GPU level was infeasible (layer kept as it was)
    moved_replicas: int = 0  # re-solve only: replicas not on their previous GPU
    layers_solved: int = 0  # layers (re)placed; the others were kept

    def as_dict(self) -> dict[str, object]:
        """JSON-safe: an unknown gap (no bound proven in time) becomes None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class _Problem:
    loads: np.ndarray  # [L, E] float
    coact: np.ndarray  # [L-1, E, E] float, already divided by top_k
    gpus: int
    gpus_per_node: int
    slots: int
    opts: IlpOptions

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node


def _incoming(p: _Problem, counts: np.ndarray, layer: int) -> np.ndarray:
    """``[E, G]`` dispatches into each expert of ``layer`` from tokens on each GPU."""
    if layer == 0:
        return np.zeros(counts.shape[1:])
    prev = counts[layer - 1]
    where = prev / np.maximum(prev.sum(axis=1, keepdims=True), 1)
    return p.coact[layer - 1].T @ where


def _link_cost(p: _Problem, dst: np.ndarray) -> np.ndarray:
    """``[E, G]`` cost of sending one dispatch from GPU ``g`` to expert ``j`` placed as ``dst``."""
    on_node = np.repeat(node_counts(dst, p.gpus_per_node) > 0, p.gpus_per_node, axis=1)
    return np.where(dst > 0, 0.0, np.where(on_node, 1.0, p.opts.node_cost))


def _outgoing(p: _Problem, counts: np.ndarray, layer: int, replicas: np.ndarray) -> np.ndarray:
    """``[E, G]`` cost of the onward traffic of one replica of ``e`` placed on ``g``."""
    if layer == counts.shape[0] - 1:
        return np.zeros(counts.shape[1:])
    return (p.coact[layer] @ _link_cost(p, counts[layer + 1])) / replicas[:, None]


def _pair_cost(p: _Problem, src: np.ndarray, dst: np.ndarray, layer: int) -> float:
    """Link cost of the dispatches from ``layer`` (placed ``src``) to ``layer + 1`` (``dst``)."""
    where = src / np.maximum(src.sum(axis=1, keepdims=True), 1)
    return float((p.coact[layer] * (where @ _link_cost(p, dst).T)).sum())


def traffic_cost(p: _Problem, counts: np.ndarray) -> float:
    """Link cost of all layer transitions (nearest-replica routing)."""
    return sum(_pair_cost(p, counts[layer], counts[layer + 1], layer) for layer in range(counts.shape[0] - 1))


def _keep_bonus(p: _Problem, previous: np.ndarray, layer: int) -> np.ndarray:
    """``[E, G]`` objective bonus of leaving a replica where the previous placement had it:
    ``migration_cost`` times the layer's mean replica load (in dispatch cost units)."""
    mean_replica = p.loads[layer].sum() / (p.gpus * p.slots)
    return p.opts.migration_cost * mean_replica * (previous[layer] > 0)


def _local_cost(
    p: _Problem, counts: np.ndarray, layer: int, placed: np.ndarray, previous: np.ndarray | None = None
) -> float:
    """The part of the objective that depends on ``layer`` if it were placed ``placed``:
    traffic to and from its neighbours, minus the bonus for replicas left in place."""
    cost = 0.0
    if previous is not None:
        cost -= float((_keep_bonus(p, previous, layer) * np.minimum(placed, 1)).sum())
    if layer > 0:
        cost += _pair_cost(p, counts[layer - 1], placed, layer - 1)
    if layer < counts.shape[0] - 1:
        cost += _pair_cost(p, placed, counts[layer + 1], layer)
    return cost


def _gpu_milp(
    size: np.ndarray, replicas: np.ndarray, coef_y: np.ndarray, coef_h: np.ndarray | None, gpus_per_node: int,
    slots: int, cap: float, start: np.ndarray | None, time_limit_s: float, rel_gap: float,
) -> MilpResult:
    """Place ``replicas[e]`` copies of each expert on distinct GPUs: min coef_y.y + coef_h.h."""
    experts, gpus = coef_y.shape
    m = Milp()
    y = m.add_vars((experts, gpus), 0, 1, cost=coef_y, integer=True)
    for e in range(experts):
        m.add_row(y[e], 1.0, replicas[e], replicas[e])
    for g in range(gpus):
        m.add_row(y[:, g], 1.0, upper=slots)
        m.add_row(y[:, g], size, upper=cap)
    start_cols = None if start is None else np.minimum(start, 1).ravel().astype(float)
    if coef_h is not None:
        nodes = gpus // gpus_per_node
        h = m.add_vars((experts, nodes), 0, 1, cost=coef_h, integer=True)
        for e in range(experts):
            for n in range(nodes):
                if coef_h[e, n] < 0:
                    cols = np.append(y[e, n * gpus_per_node:(n + 1) * gpus_per_node], h[e, n])
                    m.add_row(cols, np.append(np.ones(gpus_per_node), -1.0), lower=0.0)
        if start is not None and start_cols is not None:
            has = (node_counts(start, gpus_per_node) > 0) & (coef_h < 0)
            start_cols = np.append(start_cols, has.ravel().astype(float))
    return m.solve(time_limit_s, rel_gap=rel_gap, start=start_cols)


def _node_milp(
    size: np.ndarray, replicas: np.ndarray, coef_z: np.ndarray, coef_h: np.ndarray, per_node: int, slots: int,
    cap_node: float, start: np.ndarray, time_limit_s: float, rel_gap: float,
) -> MilpResult:
    """Replicas per node ``z[e, n]`` (at most one per GPU): min coef_z.z + coef_h.h."""
    experts, nodes = coef_z.shape
    m = Milp()
    upper = np.minimum(replicas, per_node)[:, None] * np.ones((1, nodes))
    z = m.add_vars((experts, nodes), 0, upper, cost=coef_z, integer=True)
    h = m.add_vars((experts, nodes), 0, 1, cost=coef_h, integer=True)
    for e in range(experts):
        m.add_row(z[e], 1.0, replicas[e], replicas[e])
        for n in range(nodes):
            if coef_h[e, n] < 0:
                m.add_row(np.array([z[e, n], h[e, n]]), np.array([1.0, -1.0]), lower=0.0)
    for n in range(nodes):
        m.add_row(z[:, n], 1.0, upper=per_node * slots)
        m.add_row(z[:, n], size, upper=cap_node)
    start_cols = np.concatenate([start.ravel(), ((start > 0) & (coef_h < 0)).ravel()]).astype(float)
    return m.solve(time_limit_s, rel_gap=rel_gap, start=start_cols)


def _improve_layer(
    p: _Problem, counts: np.ndarray, layer: int, cap: float, time_limit_s: float, report: SolveReport,
    previous: np.ndarray | None, onward: bool = True,
) -> tuple[np.ndarray, float]:
    """One stage-2 subproblem; returns the new placement of ``layer`` and the MILP gap.
    ``onward=False`` leaves out the traffic to the next layer (first sweep)."""
    current = counts[layer]
    replicas = current.sum(axis=1)
    size = p.loads[layer] / replicas
    incoming = _incoming(p, counts, layer)
    coef_y = -incoming
    if onward:
        coef_y = coef_y + _outgoing(p, counts, layer, replicas.astype(float))
    if previous is not None:
        coef_y = coef_y - _keep_bonus(p, previous, layer)
    coef_h = -(p.opts.node_cost - 1.0) * node_counts(incoming, p.gpus_per_node)
    k = p.gpus_per_node
    if p.nodes == 1 or current.size <= p.opts.flat_limit:
        res = _gpu_milp(size, replicas, coef_y, coef_h if p.nodes > 1 else None, k, p.slots, cap,
                        current, time_limit_s, p.opts.rel_gap)
        report.subproblems_time_limited += int(res.time_limited)
        if not res.ok:
            report.fallbacks += 1
            return current, 0.0
        return np.rint(res.values[: current.size]).astype(np.int64).reshape(current.shape), res.gap
    # hierarchical: replicas per node, then GPUs within each node
    coef_z = coef_y.reshape(len(size), p.nodes, k).mean(axis=2)
    start = node_counts(current, k)
    deadline = time.monotonic() + time_limit_s
    mean = float(p.loads[layer].sum()) / p.gpus
    for room in NODE_ROOM:  # node load caps leave the GPU packing some room under the cap
        node_cap = k * (mean + room * (cap - mean))
        node_res = _node_milp(size, replicas, coef_z, coef_h, k, p.slots, node_cap, start,
                              0.6 * max(deadline - time.monotonic(), 0.05), p.opts.rel_gap)
        report.subproblems_time_limited += int(node_res.time_limited)
        if not node_res.ok:
            break
        z = np.rint(node_res.values[: start.size]).astype(np.int64).reshape(start.shape)
        placed = np.zeros_like(current)
        feasible = True
        for n in range(p.nodes):
            cols = slice(n * k, (n + 1) * k)
            here = np.flatnonzero(z[:, n])
            same = np.array_equal(z[:, n], start[:, n])
            per_node_limit = min(max(deadline - time.monotonic(), 0.05) / (p.nodes - n), p.opts.gpu_level_time_s)
            if same:
                guess = current[here, cols]
            else:  # a balanced packing of the node's replicas, if it fits under the cap
                guess = improve_by_swaps(lpt_pack(size[here], z[here, n], k, p.slots), size[here])
                if guess.max() > 1 or float((size[here] @ guess).max()) > cap:
                    guess = None
            res = _gpu_milp(size[here], z[here, n], coef_y[here, cols], None, k, p.slots, cap,
                            guess, per_node_limit, p.opts.rel_gap)
            report.subproblems_time_limited += int(res.time_limited)
            if not res.ok:
                feasible = False
                break
            placed[here, cols] = np.rint(res.values).astype(np.int64).reshape(len(here), k)
        if feasible:
            return placed, node_res.gap
        log.debug("layer %d: node %d does not pack under the cap (node room %.2f)", layer, n, room)
    report.fallbacks += 1
    return current, 0.0


def solve_ilp(
    loads: np.ndarray, coact: np.ndarray, top_k: int, gpus: int, gpus_per_node: int, slots: int,
    opts: IlpOptions | None = None, start: np.ndarray | None = None, layers_to_solve: list[int] | None = None,
) -> tuple[np.ndarray, SolveReport]:
    """Placement ``[layers, experts, gpus]`` and its report.

    ``start`` (a previous placement) with ``layers_to_solve`` re-solves only those layers,
    keeping the others and preferring (``opts.migration_cost``) replicas where they were.
    """
    opts = opts or IlpOptions()
    t0 = time.monotonic()
    deadline = t0 + opts.time_limit_s
    p = _Problem(loads.astype(float), coact.astype(float) / top_k, gpus, gpus_per_node, slots, opts)
    num_layers = loads.shape[0]
    todo = list(range(num_layers)) if layers_to_solve is None else sorted(layers_to_solve)
    report = SolveReport(layers_solved=len(todo))
    baseline = eplb(p.loads, gpus, gpus_per_node, slots)
    counts = baseline.copy() if start is None else start.copy()
    # stage 1: balance
    polish_s = opts.stage1_time_share * opts.time_limit_s / max(len(todo), 1)
    caps = gpu_loads(counts, p.loads).max(axis=1)
    worst_gap = 0.0
    for layer in todo:
        res = balance_layer(
            p.loads[layer], gpus, slots, baseline[layer], target_gap=opts.stage1_target_gap,
            time_limit_s=min(polish_s, 1.0) if start is None else 0.0,
            previous=None if start is None else start[layer],
        )
        counts[layer] = res.counts
        report.subproblems_time_limited += int(res.time_limited)
        base_max = float(gpu_loads(baseline[layer], p.loads[layer]).max())
        caps[layer] = min((1.0 + opts.tolerance) * res.max_load, max(res.max_load, base_max))
        worst_gap = max(worst_gap, res.gap)
    report.stage1_max_load = gpu_loads(counts, p.loads).max(axis=1).tolist()
    report.lower_bound = (p.loads.sum(axis=1) / gpus).tolist()
    report.cap = caps.tolist()
    report.stage1_gap = worst_gap
    cost = traffic_cost(p, counts)
    report.traffic_cost_start = cost
    log.info("stage 1 done in %.1fs: worst gap %.4f, traffic cost %.0f", time.monotonic() - t0, worst_gap, cost)
    # stage 2: traffic, layer by layer with neighbours fixed
    out_of_time = False
    for sweep in range(opts.max_sweeps):
        order = todo if sweep % 2 == 0 else todo[::-1]
        first = sweep == 0 and start is None
        if first:
            order = [layer for layer in todo if layer > 0]  # nothing to align layer 0 with yet
        sweep_gap = 0.0
        for i, layer in enumerate(order):
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                out_of_time = report.time_limited = True
                break
            # later sweeps count a quarter: they start from a good placement
            layers_left = (len(order) - i) + len(todo) * max(opts.max_sweeps - sweep - 1, 0) * 0.25
            limit = min(remaining / layers_left, 20.0)
            new, gap = _improve_layer(p, counts, layer, float(caps[layer]), limit, report, start, not first)
            report.subproblems += 1
            sweep_gap = max(sweep_gap, gap)
            # the hierarchical split approximates; keep the exact better of old and new
            before = _local_cost(p, counts, layer, counts[layer], start)
            if first or _local_cost(p, counts, layer, new, start) < before:
                counts[layer] = new
        report.sweeps = sweep + 1
        report.subproblem_gap = sweep_gap
        new_cost = traffic_cost(p, counts)
        log.info("sweep %d: traffic cost %.0f -> %.0f at %.1fs", sweep + 1, cost, new_cost, time.monotonic() - t0)
        gained = (cost - new_cost) / max(cost, 1e-12)
        cost = new_cost
        if out_of_time or (sweep > 0 and gained < opts.min_improvement):
            break
    report.traffic_cost = cost
    if start is not None:
        report.moved_replicas = int(np.maximum(counts - start, 0).sum())
    report.seconds = time.monotonic() - t0
    return counts, report
