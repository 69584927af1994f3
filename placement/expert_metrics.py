"""Quality of an expert placement against a routing trace's statistics.

A placement of one layer is a count matrix ``[experts, gpus]`` (how many replicas of
expert ``e`` GPU ``g`` holds, normally 0 or 1); a whole placement is ``[layers, experts,
gpus]``. GPUs ``n*K .. n*K+K-1`` form node ``n`` (``K`` = GPUs per node).

Model (the same the ILP optimises):
- load: a replicated expert's tokens split evenly among its replicas (the router spreads
  them), so GPU load = sum over its replicas of ``load[e] / replicas[e]``;
- traffic between layer ``l`` and ``l + 1``: a token leaves each of its ``top_k`` experts
  at ``l`` from one of that expert's replicas (uniformly) and is dispatched to each of its
  experts at ``l + 1``; a co-activation pair counts ``1 / top_k`` dispatch, so a layer
  transition moves ``tokens * top_k`` dispatches in all. With ``routing="nearest"`` the
  dispatch goes to the replica on the same GPU, else on the same node, else any
  (locality-aware routing); with ``"uniform"`` to a uniformly chosen replica.
  Nearest routing does not move load between replicas in this model, which is optimistic
  when replicas of a hot expert are unevenly reachable.
- link cost: same GPU 0, same node 1, other node ``node_cost``.
The lower bound of the most loaded GPU is total load / GPUs: the LP relaxation of the
placement problem (fractional replicas) reaches it whenever slots suffice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

NODE_COST = 8.0  # cross-node vs intra-node link (NVLink ~450 GB/s vs a 400 Gb/s NIC: ~9x)


def counts_from_lists(layers: list[list[list[int]]], experts: int) -> np.ndarray:
    """``[layers, experts, gpus]`` replica counts from PLACEMENT.json's ``layers``."""
    num_gpus = len(layers[0]) if layers else 0
    out = np.zeros((len(layers), experts, num_gpus), dtype=np.int64)
    for layer, gpus in enumerate(layers):
        for g, ids in enumerate(gpus):
            for e in ids:
                out[layer, e, g] += 1
    return out


def lists_from_counts(counts: np.ndarray) -> list[list[list[int]]]:
    """PLACEMENT.json's ``layers`` from ``[layers, experts, gpus]`` counts."""
    result: list[list[list[int]]] = []
    for layer in counts:
        gpus = []
        for g in range(layer.shape[1]):
            ids = np.repeat(np.arange(layer.shape[0]), layer[:, g])
            gpus.append([int(e) for e in ids])
        result.append(gpus)
    return result


def check_placement(layers: object, experts: int, num_layers: int, gpus: int, slots: int) -> list[str]:
    """Problems of a placement in PLACEMENT.json form (empty list: valid)."""
    problems: list[str] = []
    if not isinstance(layers, list) or len(layers) != num_layers:
        n = len(layers) if isinstance(layers, list) else type(layers).__name__
        return [f"layers: expected a list of {num_layers} layers, found {n}"]
    for li, layer in enumerate(layers):
        if not isinstance(layer, list) or len(layer) != gpus:
            problems.append(f"layers[{li}]: expected {gpus} GPU lists")
            continue
        seen = np.zeros(experts, dtype=bool)
        for g, ids in enumerate(layer):
            if not isinstance(ids, list) or not all(isinstance(e, int) and 0 <= e < experts for e in ids):
                problems.append(f"layers[{li}][{g}]: expected a list of expert ids in [0, {experts - 1}]")
                continue
            if len(ids) > slots:
                problems.append(f"layers[{li}][{g}]: holds {len(ids)} experts, more than slots={slots}")
            seen[ids] = True
        missing = np.flatnonzero(~seen)
        if len(missing):
            problems.append(f"layers[{li}]: experts {missing[:8].tolist()} are on no GPU")
    return problems


def gpu_loads(counts: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """``[..., gpus]`` load per GPU, replicas sharing their expert's load evenly."""
    replicas = counts.sum(axis=-1, keepdims=True)
    share = np.divide(loads[..., None], replicas, out=np.zeros(counts.shape), where=replicas > 0)
    return (share * counts).sum(axis=-2)


def node_counts(counts: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """``[..., experts, nodes]`` replicas per node."""
    shape = counts.shape[:-1] + (counts.shape[-1] // gpus_per_node, gpus_per_node)
    return counts.reshape(shape).sum(axis=-1)


def pair_traffic(
    src: np.ndarray, dst: np.ndarray, coact: np.ndarray, top_k: int, gpus_per_node: int, routing: str = "nearest"
) -> tuple[float, float]:
    """(cross-GPU, cross-node) dispatches from a layer placed as ``src`` to one placed as
    ``dst`` (count matrices ``[experts, gpus]``); cross-GPU includes cross-node."""
    p_src = src / np.maximum(src.sum(axis=1, keepdims=True), 1)  # where a token at expert i sits
    src_node = node_counts(p_src, gpus_per_node)
    dst_node = node_counts(dst, gpus_per_node)
    if routing == "nearest":
        miss_gpu = p_src @ (dst == 0).T  # [i, j]: probability that j is not on the token's GPU
        miss_node = src_node @ (dst_node == 0).T
    elif routing == "uniform":
        q_dst = dst / np.maximum(dst.sum(axis=1, keepdims=True), 1)
        miss_gpu = 1.0 - p_src @ q_dst.T
        miss_node = 1.0 - src_node @ node_counts(q_dst, gpus_per_node).T
    else:
        raise ValueError(f"routing {routing!r}: expected 'nearest' or 'uniform'")
    return float((coact * miss_gpu).sum() / top_k), float((coact * miss_node).sum() / top_k)


@dataclass
class PlacementMetrics:
    valid: bool  # every expert of every layer on some GPU, no GPU over its slots
    problems: list[str]  # what makes it invalid, one line each
    max_load: list[float]  # per layer, tokens on the most loaded GPU
    lower_bound: list[float]  # per layer, total load / GPUs
    cross_gpu: list[float]  # per transition l -> l+1, dispatches leaving their GPU
    cross_node: list[float]  # per transition, dispatches leaving their node
    dispatches: float  # all dispatches over all transitions (tokens * top_k * (layers - 1))
    node_cost: float  # link cost of a cross-node dispatch used in summary["link_cost"]
    summary: dict[str, float] = field(default_factory=dict)  # aggregates, see placement_metrics

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def placement_metrics(
    counts: np.ndarray, loads: np.ndarray, coact: np.ndarray, top_k: int, gpus_per_node: int, slots: int,
    routing: str = "nearest", node_cost: float = NODE_COST,
) -> PlacementMetrics:
    """Balance, traffic and validity of ``counts`` ``[layers, experts, gpus]``."""
    num_layers, experts, gpus = counts.shape
    problems = check_placement(lists_from_counts(counts), experts, num_layers, gpus, slots)
    per_gpu = gpu_loads(counts, loads.astype(float))
    max_load = per_gpu.max(axis=1)
    lower = loads.sum(axis=1) / gpus
    cross_gpu, cross_node = [], []
    for layer in range(num_layers - 1):
        cg, cn = pair_traffic(counts[layer], counts[layer + 1], coact[layer], top_k, gpus_per_node, routing)
        cross_gpu.append(cg)
        cross_node.append(cn)
    dispatches = float(loads[1:].sum())
    ratio = max_load / np.maximum(lower, 1e-12)
    total_cn, total_cg = float(sum(cross_node)), float(sum(cross_gpu))
    summary = {
        "balance_mean": float(ratio.mean()),  # mean over layers of max GPU load / lower bound
        "balance_worst": float(ratio.max()),
        "cross_node": total_cn,
        "cross_gpu": total_cg,
        "cross_node_fraction": total_cn / max(dispatches, 1e-12),
        "cross_gpu_fraction": total_cg / max(dispatches, 1e-12),
        "link_cost": node_cost * total_cn + (total_cg - total_cn),
    }
    return PlacementMetrics(
        not problems, problems, max_load.tolist(), lower.tolist(), cross_gpu, cross_node, dispatches,
        node_cost, summary,
    )
