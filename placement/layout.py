"""What the layout search takes and gives: the workload it simulates, the SLO it scores
against, and a layout with its predicted goodput."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from placement.simulator import SimRequest, poisson_requests


@dataclass(frozen=True)
class Workload:
    # Prompt and output lengths are drawn uniformly from these ranges (tokens).
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    num_requests: int = 400
    seed: int = 0
    # Arrivals must span at least this long (else a high rate is only a short burst that
    # drains within the SLO), up to max_requests.
    min_duration_s: float = 60.0
    max_requests: int = 4000

    def requests(self, rate: float) -> list[SimRequest]:
        lo_p, hi_p = self.prompt_range
        lo_o, hi_o = self.output_range
        n = int(min(max(self.num_requests, rate * self.min_duration_s), self.max_requests))
        return poisson_requests(rate, n, lambda g: int(g.integers(lo_p, hi_p + 1)),
                                lambda g: int(g.integers(lo_o, hi_o + 1)), self.seed)

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_range) / 2

    @property
    def mean_output(self) -> float:
        return sum(self.output_range) / 2


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


@dataclass
class Layout:
    mode: str  # "colocated" | "disaggregated"
    # Per pool: tp, pp, replicas, node of each replica (and, colocated, the step budget).
    pools: dict[str, dict[str, object]]
    gpus: int
    goodput_rps: float
    ttft_p90_s: float = float("nan")
    tpot_p90_s: float = float("nan")
    notes: list[str] = field(default_factory=list)
    # "disaggregated", "disaggregated/ae", "colocated/chunked", "colocated/whole" or
    # "colocated/prefill-first" (see placement.search).
    kind: str = ""

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rps / max(1, self.gpus)


def place_units(unit: list[int], units: int, per_node: int, num_nodes: int) -> list[list[int]] | None:
    """Node of every instance of ``units`` copies of a unit (instance sizes in GPUs): a
    unit's instances go to one node when they fit (KV stays on NVLink), and an instance
    never spans nodes. None when they do not fit on ``num_nodes`` nodes."""
    free = [per_node] * num_nodes
    out: list[list[int]] = []
    for _ in range(units):
        nodes: list[int] = []
        home = next((n for n, f in enumerate(free) if f >= sum(unit)), None)
        for g in unit:
            n = home if home is not None and free[home] >= g else next(
                (n for n, f in enumerate(free) if f >= g), None)
            if n is None:
                return None
            free[n] -= g
            nodes.append(n)
        out.append(nodes)
    return out


def replicate(unit: Layout, num_gpus: int, per_node: int) -> Layout | None:
    """Repeat a prefill+decode unit to fill the GPU budget, units kept inside a node when
    they fit, no instance across nodes."""
    p, d = unit.pools["prefill"], unit.pools["decode"]
    n_p, n_d = int(p["replicas"]), int(d["replicas"])  # type: ignore[call-overload]
    gp = int(p["tp"]) * int(p["pp"])  # type: ignore[call-overload]
    gd = int(d["gpus"]) if "gpus" in d else int(d["tp"]) * int(d["pp"])  # type: ignore[call-overload]
    sizes = [gp] * n_p + [gd] * n_d
    units = max(1, num_gpus // unit.gpus)
    placed = None
    while units >= 1:
        placed = place_units(sizes, units, per_node, math.ceil(num_gpus / per_node))
        if placed is not None:
            break
        units -= 1
    if placed is None:
        return None
    nodes_p = [n for u in placed for n in u[:n_p]]
    nodes_d = [n for u in placed for n in u[n_p:]]
    return Layout("disaggregated",
                  {"prefill": {**p, "replicas": n_p * units, "nodes": nodes_p},
                   "decode": {**d, "replicas": n_d * units, "nodes": nodes_d}},
                  unit.gpus * units, unit.goodput_rps * units, unit.ttft_p90_s, unit.tpot_p90_s,
                  notes=unit.notes + [f"{units} units"], kind=unit.kind)


def best_of_kind(layouts: list[Layout]) -> dict[str, Layout]:
    """The best layout of each kind (layouts come best first)."""
    out: dict[str, Layout] = {}
    for lay in layouts:
        out.setdefault(lay.kind or lay.mode, lay)
    return out
