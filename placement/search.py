"""Layout search: which parallelism, how many replicas of each pool, and which nodes, to
maximise goodput per GPU under the SLO.

DistServe's approach (OSDI 2024, algorithm 1): size the prefill instance against the TTFT
SLO and the decode instance against the TPOT SLO separately, each by simulated goodput
of one instance, then replicate them in the ratio that balances their rates. We add the
KV-transfer term (which DistServe leaves out) by simulating the combined unit, placed so
that KV stays inside a node where possible, and compare against colocated layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from placement.catalogue import GPU, ModelShape
from placement.latency import LatencyModel, roofline
from placement.simulator import (ClusterSpec, Instance, SimRequest, Simulation, attainment,
                                 max_goodput_rate, poisson_requests)

LatencyFn = Callable[[int, int], LatencyModel]  # (tp, pp) -> model


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


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


@dataclass
class Layout:
    mode: str  # "colocated" | "disaggregated"
    # Per pool: tp, pp, replicas, node of each replica.
    pools: dict[str, dict[str, object]]
    gpus: int
    goodput_rps: float
    ttft_p90_s: float = float("nan")
    tpot_p90_s: float = float("nan")
    notes: list[str] = field(default_factory=list)

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rps / max(1, self.gpus)


def parallel_options(model: ModelShape, gpu: GPU, max_gpus: int, kv_reserve: float = 0.2) -> list[tuple[int, int]]:
    """(tp, pp) pairs that fit the model's weights with kv_reserve of memory left for KV."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpu.gpus_per_node or model.num_heads % tp or model.num_kv_heads % tp and model.num_kv_heads >= tp:
            continue
        for pp in (1, 2, 4, 8):
            if tp * pp > max_gpus or model.num_layers % pp:
                continue
            per_gpu = model.weight_bytes / (tp * pp)
            if per_gpu <= gpu.mem_gib * (1 << 30) * (1 - kv_reserve):
                out.append((tp, pp))
    return out


def kv_capacity_tokens(model: ModelShape, gpu: GPU, tp: int, pp: int) -> int:
    free = gpu.mem_gib * (1 << 30) * tp * pp * 0.9 - model.weight_bytes
    return max(0, int(free / model.kv_bytes_per_token))


def _instance(kind: str, model: ModelShape, gpu: GPU, lat: LatencyFn, tp: int, pp: int, node: int = 0,
              budget: int = 2048) -> Instance:
    return Instance(kind, lat(tp, pp), node=node, max_batched_tokens=budget, max_num_seqs=256,
                    kv_capacity_tokens=kv_capacity_tokens(model, gpu, tp, pp))


def _p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90)) if xs else float("nan")


def evaluate(spec_fn: Callable[[], ClusterSpec], wl: Workload, slo: SLO) -> tuple[float, float, float]:
    rate = max_goodput_rate(spec_fn, wl.requests, slo.ttft_s, slo.tpot_s, slo.attainment, hi=1.0, iters=8)
    reqs = Simulation(spec_fn()).run(wl.requests(max(rate, 1e-3)))
    return rate, _p90([r.ttft_s for r in reqs]), _p90([r.tpot_s for r in reqs])


def search(model: ModelShape, gpu: GPU, num_gpus: int, slo: SLO, wl: Workload,
           lat: LatencyFn | None = None, codec_ratio: float = 1.0) -> list[Layout]:
    """All layouts considered, best goodput per GPU first."""
    lat = lat or (lambda tp, pp: roofline(model, gpu, tp, pp))
    link_local = gpu.intra_node_gbps * 1e9
    link_remote = gpu.cross_node_gbps * 1e9
    opts = parallel_options(model, gpu, num_gpus)
    layouts: list[Layout] = []

    def spec(instances: list[Instance]) -> ClusterSpec:
        return ClusterSpec(instances, kv_bytes_per_token=model.kv_bytes_per_token, codec_ratio=codec_ratio,
                           link_bps=lambda a, b: link_local if a == b else link_remote)

    # Colocated: one instance's goodput, replicated.
    for tp, pp in opts:
        rate, t90, p90 = evaluate(lambda: spec([_instance("colocated", model, gpu, lat, tp, pp)]), wl, slo)
        n = num_gpus // (tp * pp)
        layouts.append(Layout("colocated", {"colocated": {"tp": tp, "pp": pp, "replicas": n}},
                              n * tp * pp, rate * n, t90, p90))

    # Disaggregated: best single-phase instances first (per-GPU rate), then the ratio.
    def phase_rate(kind: str, tp: int, pp: int) -> float:
        if kind == "prefill":
            slo_p = SLO(slo.ttft_s, float("inf"), slo.attainment)
            mk = lambda: spec([_instance("prefill", model, gpu, lat, tp, pp),  # noqa: E731
                               _instance("decode", model, gpu, lat, 8, 1)])
            return max_goodput_rate(mk, wl.requests, slo_p.ttft_s, 1e9, slo.attainment, iters=8)
        mk = lambda: spec([_instance("prefill", model, gpu, lambda t, p: lat(t, p), 8 if 8 in [o[0] for o in opts] else tp, 1),  # noqa: E731
                           _instance("decode", model, gpu, lat, tp, pp)])
        return max_goodput_rate(mk, wl.requests, 1e9, slo.tpot_s, slo.attainment, iters=8)

    best_p = sorted(((phase_rate("prefill", tp, pp) / (tp * pp), tp, pp) for tp, pp in opts), reverse=True)[:2]
    best_d = sorted(((phase_rate("decode", tp, pp) / (tp * pp), tp, pp) for tp, pp in opts), reverse=True)[:2]
    for rp, tpp, ppp in best_p:
        for rd, tpd, ppd in best_d:
            if rp <= 0 or rd <= 0:
                continue
            gp, gd = tpp * ppp, tpd * ppd
            # Replica ratio that balances the phases: n_p * (r_p * g_p) == n_d * (r_d * g_d),
            # with r the per-GPU rate of an instance of g GPUs.
            ratio = (rp * gp) / (rd * gd)
            best: Layout | None = None
            for n_p in range(1, num_gpus // gp + 1):
                n_d = max(1, round(n_p * ratio))
                if n_p * gp + n_d * gd > num_gpus:
                    break
                per_node = gpu.gpus_per_node
                nodes_p = [(i * gp) // per_node for i in range(n_p)]
                nodes_d = [((n_p * gp) + i * gd) // per_node for i in range(n_d)]
                insts = ([_instance("prefill", model, gpu, lat, tpp, ppp, node=n) for n in nodes_p]
                         + [_instance("decode", model, gpu, lat, tpd, ppd, node=n) for n in nodes_d])
                rate, t90, p90 = evaluate(lambda insts=insts: spec([_copy(i) for i in insts]), wl, slo)
                lay = Layout("disaggregated",
                             {"prefill": {"tp": tpp, "pp": ppp, "replicas": n_p, "nodes": nodes_p},
                              "decode": {"tp": tpd, "pp": ppd, "replicas": n_d, "nodes": nodes_d}},
                             n_p * gp + n_d * gd, rate, t90, p90)
                if best is None or lay.goodput_per_gpu > best.goodput_per_gpu:
                    best = lay
                if n_p >= 4:  # the unit repeats; larger groups only add rounding slack
                    break
            if best is not None:
                layouts.append(_replicate(best, num_gpus, gpu.gpus_per_node))
    layouts.sort(key=lambda lay: lay.goodput_per_gpu, reverse=True)
    return layouts


def _replicate(unit: Layout, num_gpus: int, per_node: int) -> Layout:
    """Repeat a prefill+decode unit to fill the GPU budget, each copy on the next GPUs."""
    units = max(1, num_gpus // unit.gpus)
    p, d = unit.pools["prefill"], unit.pools["decode"]
    n_p, n_d = int(p["replicas"]), int(d["replicas"])  # type: ignore[call-overload]
    gp, gd = int(p["tp"]) * int(p["pp"]), int(d["tp"]) * int(d["pp"])  # type: ignore[call-overload]
    nodes_p, nodes_d = [], []
    for u in range(units):
        base = u * unit.gpus
        nodes_p += [(base + i * gp) // per_node for i in range(n_p)]
        nodes_d += [(base + n_p * gp + i * gd) // per_node for i in range(n_d)]
    return Layout("disaggregated",
                  {"prefill": {**p, "replicas": n_p * units, "nodes": nodes_p},
                   "decode": {**d, "replicas": n_d * units, "nodes": nodes_d}},
                  unit.gpus * units, unit.goodput_rps * units, unit.ttft_p90_s, unit.tpot_p90_s)


def _copy(i: Instance) -> Instance:
    return Instance(i.kind, i.model, i.node, i.max_batched_tokens, i.max_num_seqs, i.kv_capacity_tokens)


def meets(layout: Layout, slo: SLO) -> bool:
    return layout.goodput_rps > 0 and not math.isnan(layout.ttft_p90_s)
