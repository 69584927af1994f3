"""Stage 1 of the expert-placement ILP: per layer, replication counts and an assignment of
replicas to GPUs that minimise the most loaded GPU (MoETuner's load-balancing ILP, 2025,
with DeepSeek-style replication of hot experts in the slot budget).

Replication counts come from the greedy that minimises the largest replica load (it
uses every slot); the assignment is packed by longest-processing-time first under the
slot and one-replica-per-GPU limits, improved by pairwise swaps, and, when it is still
above the lower bound (total load / GPUs) by more than ``target_gap``, polished by the
assignment MILP on HiGHS started from that packing. The result also keeps the EPLB
placement when that is better, so stage 1 never loses to the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.eplb import replicate
from placement.expert_metrics import gpu_loads
from placement.milp import Milp


@dataclass(frozen=True)
class BalanceResult:
    counts: np.ndarray  # [experts, gpus]
    max_load: float
    lower_bound: float  # total load / gpus
    bound: float  # best proven lower bound on the max load under these replication counts
    milp_used: bool
    time_limited: bool

    @property
    def gap(self) -> float:
        """Max load above the LP lower bound, relative to the max load."""
        return (self.max_load - self.lower_bound) / max(self.max_load, 1e-12)


def lpt_pack(size: np.ndarray, replicas: np.ndarray, gpus: int, slots: int) -> np.ndarray:
    """Counts ``[experts, gpus]``: replicas (of size ``size[e]``) placed heaviest first on
    the lightest GPU with a free slot that does not hold the expert yet."""
    experts = len(size)
    counts = np.zeros((experts, gpus), dtype=np.int64)
    load = np.zeros(gpus)
    used = np.zeros(gpus, dtype=np.int64)
    owners = np.repeat(np.arange(experts), replicas)
    return _place_heaviest_first(counts, size, owners, load, used, slots)


def warm_pack(size: np.ndarray, replicas: np.ndarray, previous: np.ndarray, slots: int) -> np.ndarray:
    """Counts ``[experts, gpus]`` that keep as many replicas as possible where
    ``previous`` had them (at most ``replicas[e]`` of each, lightest-first kept on GPUs
    that would overflow) and place the rest heaviest first on the lightest free GPU."""
    experts, gpus = previous.shape
    counts = np.zeros_like(previous)
    for e in range(experts):
        keep = np.flatnonzero(previous[e] > 0)[: replicas[e]]
        counts[e, keep] = 1
    for g in range(gpus):  # a GPU over its slots gives back its lightest replicas
        held = np.flatnonzero(counts[:, g])
        extra = len(held) - slots
        if extra > 0:
            counts[held[np.argsort(size[held])[:extra]], g] = 0
    load = size @ counts
    used = counts.sum(axis=0)
    missing = replicas - counts.sum(axis=1)
    owners = np.repeat(np.arange(experts), np.maximum(missing, 0))
    return _place_heaviest_first(counts, size, owners, load, used, slots)


def improve_by_swaps(counts: np.ndarray, size: np.ndarray, max_rounds: int = 2000) -> np.ndarray:
    """Swap a replica on the most loaded GPU with a lighter one elsewhere (or move it to a
    free slot) while that lowers the larger of the two GPU loads."""
    counts = counts.copy()
    slots_used = counts.sum(axis=0)
    slots = int(slots_used.max())
    for _ in range(max_rounds):
        load = size @ counts
        top = int(np.argmax(load))
        best: tuple[float, int, int, int] | None = None  # (new pair max, a, b or -1, gpu)
        for a in np.flatnonzero(counts[:, top]):
            ok_gpu = counts[a] == 0
            ok_gpu[top] = False
            # moves into a free slot
            free = np.flatnonzero(ok_gpu & (slots_used < slots))
            if len(free):
                g = int(free[np.argmin(load[free])])
                val = max(load[top] - size[a], load[g] + size[a])
                if val < load[top] - 1e-9 and (best is None or val < best[0]):
                    best = (val, int(a), -1, g)
            # swaps: b on g, lighter than a, not held by top, a not held by g
            b_idx, g_idx = np.nonzero(counts[:, ok_gpu])
            if not len(b_idx):
                continue
            g_idx = np.flatnonzero(ok_gpu)[g_idx]
            delta = size[a] - size[b_idx]
            fine = (delta > 1e-12) & (counts[b_idx, top] == 0)
            if not fine.any():
                continue
            b_idx, g_idx, delta = b_idx[fine], g_idx[fine], delta[fine]
            val = np.maximum(load[top] - delta, load[g_idx] + delta)
            i = int(np.argmin(val))
            if val[i] < load[top] - 1e-9 and (best is None or val[i] < best[0]):
                best = (float(val[i]), int(a), int(b_idx[i]), int(g_idx[i]))
        if best is None:
            break
        _, a_move, b, g = best
        counts[a_move, top] -= 1
        counts[a_move, g] += 1
        if b >= 0:
            counts[b, g] -= 1
            counts[b, top] += 1
        else:
            slots_used[top] -= 1
            slots_used[g] += 1
    return counts


def assignment_milp(
    size: np.ndarray, replicas: np.ndarray, gpus: int, slots: int, start: np.ndarray, time_limit_s: float
) -> tuple[np.ndarray, float, bool]:
    """Min-max-load assignment of fixed replica counts; returns (counts, proven lower bound
    on the max load, time limited)."""
    experts = len(size)
    m = Milp()
    y = m.add_vars((experts, gpus), 0, 1, integer=True)
    t = m.add_vars((1,), 0, cost=1.0)
    for e in range(experts):
        m.add_row(y[e], 1.0, replicas[e], replicas[e])
    for g in range(gpus):
        m.add_row(y[:, g], 1.0, upper=slots)
        m.add_row(np.append(y[:, g], t[0]), np.append(size, -1.0), upper=0.0)
    start_t = float((size @ start).max())
    res = m.solve(time_limit_s, rel_gap=1e-4, start=np.append(np.minimum(start, 1).ravel(), start_t))
    if not res.ok or res.objective > start_t:
        return start, res.bound if res.ok else 0.0, res.time_limited
    counts = np.rint(res.values[y]).astype(np.int64)
    return counts, res.bound, res.time_limited


def balance_layer(
    weight: np.ndarray, gpus: int, slots: int, baseline: np.ndarray | None = None,
    target_gap: float = 0.002, time_limit_s: float = 0.0, previous: np.ndarray | None = None,
    warm_slack: float = 0.005,
) -> BalanceResult:
    """Stage 1 for one layer with expert loads ``weight``; ``baseline`` (EPLB counts)
    is kept if it is better. With ``previous`` (a re-solve), a packing that keeps replicas
    where they were is preferred unless it is more than ``warm_slack`` worse balanced."""
    weight = weight.astype(float)
    lower = float(weight.sum() / gpus)
    replicas = replicate(weight, min(gpus * slots, len(weight) * gpus), most=gpus)
    size = weight / replicas
    counts = improve_by_swaps(lpt_pack(size, replicas, gpus, slots), size)
    max_load = float((size @ counts).max())
    if previous is not None:
        warm = improve_by_swaps(warm_pack(size, replicas, previous, slots), size)
        warm_max = float((size @ warm).max())
        if warm_max <= max_load * (1.0 + warm_slack):
            counts, max_load = warm, warm_max
    bound, milp_used, limited = max(lower, float(size.max())), False, False
    if (max_load - lower) > target_gap * max_load and time_limit_s > 0 and counts.max() <= 1:
        counts, milp_bound, limited = assignment_milp(size, replicas, gpus, slots, counts, time_limit_s)
        max_load, bound, milp_used = float((size @ counts).max()), max(bound, milp_bound), True
    if baseline is not None and baseline.max() <= 1:  # stage 2 keeps replicas on distinct GPUs
        base_max = float(gpu_loads(baseline, weight).max())
        if base_max < max_load:
            counts, max_load = baseline.copy(), base_max
    return BalanceResult(counts, max_load, lower, bound, milp_used, limited)


def _place_heaviest_first(counts: np.ndarray, size: np.ndarray, owners: np.ndarray, load: np.ndarray,
                          used: np.ndarray, slots: int) -> np.ndarray:
    """Place one replica per entry of ``owners``, heaviest expert first, on the least
    loaded GPU with a free slot (preferring GPUs without a copy of that expert)."""
    for e in owners[np.argsort(-size[owners], kind="stable")]:
        room = (used < slots) & (counts[e] == 0)
        if not room.any():
            room = used < slots
        candidates = np.flatnonzero(room)
        g = int(candidates[np.argmin(load[candidates])])
        counts[e, g] += 1
        load[g] += size[e]
        used[g] += 1
    return counts
