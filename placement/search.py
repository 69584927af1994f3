"""Layout search: which parallelism, how many replicas of each pool, and which nodes, to
maximise goodput per GPU under the SLO.

DistServe's approach (Zhong et al., OSDI 2024, section 4, algorithm 1): size the prefill
instance against the TTFT SLO and the decode instance against the TPOT SLO separately,
each by the simulated goodput of one instance, then replicate them in the ratio that
balances their rates. We add the KV-transfer term (which DistServe leaves out) by
simulating the combined unit, placed so that KV stays inside a node where possible, and
compare against colocated layouts of three kinds, labelled:

- ``colocated/chunked``: prefill chunks ride along with decodes under a token budget
  (Sarathi / DeepSpeed-FastGen "SplitFuse"; what splitserve's colocated worker does);
- ``colocated/whole``: the same worker with a budget large enough for whole prompts
  (16384 tokens): a step carries the decodes and whole prompts, so the decodes wait as
  long as the prompts take;
- ``colocated/prefill-first``: vLLM <= 0.3's scheduler, the baseline DistServe measured
  against (section 6.1): waiting prompts get a step of their own and every decode waits
  for it. splitserve's engine schedules decodes first, so this kind is a prediction for
  comparison (``NOT_SERVABLE``), never a plan.

How the search stays fast (a 64-GPU cluster in well under a minute on one core):

1. memory first: a (tp, pp) whose weights leave no room for one longest request's KV is
   never simulated;
2. one instance per phase: the prefill goodput (TTFT only) and decode goodput (TPOT only)
   of each parallelism are simulated in isolation, once, whatever the cluster size; the
   bisection on rate starts from a capacity estimate and stops at a relative tolerance
   (attainment is monotone in rate, so the bracket is valid);
3. bounds: a (prefill, decode) pair can do no better per GPU than the two phases in the
   continuous ratio, ``1 / (g_p / r_p + g_d / r_d)``; pairs are verified best bound first,
   and the rest are dropped once their bound is below the best verified layout (with a
   small slack for the pooling gain of several instances behind one router);
4. a unit (a few prefill + decode instances) is verified by simulation with transfers, then
   replicated over the cluster; the cluster itself is never simulated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from placement.catalogue import GPU, ModelShape
from placement.attention_expert import ae_capacity, ae_kv_capacity_tokens, ae_options, ae_roofline
from placement.attention_expert import AttentionExpert
from placement.latency import ALLREDUCE_LATENCY_S, Coeffs, LatencyModel, roofline
from placement.layout import SLO, Layout, Workload, best_of_kind, place_units, replicate  # noqa: F401 - re-exported
from placement.simulator import ClusterSpec, Instance, Simulation, attainment

LatencyFn = Callable[[int, int], LatencyModel]  # (tp, pp) -> model

# Token budget of a chunked-prefill colocated step (vLLM 0.4-0.6's default budget with
# chunked prefill on; prompts longer than this are split across steps) and of a prefill
# instance's batch (DistServe, section 4.3: beyond
# a few thousand tokens a prefill batch is compute bound and batching only adds latency).
CHUNKED_BUDGET = 512
PREFILL_BUDGET = 4096
# "Whole prompts": vLLM's max_num_batched_tokens in DistServe's baseline runs
# (evaluation/2-benchmark-serving/2-start-api-server.py in LLMServe/DistServe).
WHOLE_BUDGET = 16384
# Sequences batched at once by decode and colocated instances: DistServe ran both its
# decode instances and vLLM with 1024 (--decoding-max-batch-size, --max-num-seqs).
MAX_NUM_SEQS = 1024
# Goodput is searched up to this multiple of an instance's estimated capacity (the
# estimate is a mean-value one; the slack keeps it from cutting a true goodput short).
CAP_SLACK = 1.1
# Kinds scored and shown but never chosen by ``splitserve plan``: serve cannot realise them.
NOT_SERVABLE = ("colocated/prefill-first",)
# Colocated kinds: (kind, step budget, prompts in steps of their own).
COLOCATED_KINDS = (("colocated/chunked", CHUNKED_BUDGET, False), ("colocated/whole", WHOLE_BUDGET, False),
                   ("colocated/prefill-first", WHOLE_BUDGET, True))


def catalogue_latency(model: ModelShape, gpu: GPU, tp: int, pp: int = 1) -> LatencyModel:
    """The roofline of ``placement.latency`` with the GPU type's achieved efficiencies
    from the catalogue, plus the per-collective latency the catalogue gives for the GPU's
    interconnect where it is higher than the roofline's built-in constant (TP adds two
    all-reduces per layer to every step, prefill and decode alike)."""
    lat = roofline(model, gpu, tp, pp, **({"mfu": gpu.mfu} if gpu.mfu else {}),
                   **({"mbu": gpu.mbu} if gpu.mbu else {}))
    extra = 0.0
    if tp > 1 and gpu.allreduce_latency_us:
        extra = 2 * model.num_layers * max(0.0, gpu.allreduce_latency_us * 1e-6 - ALLREDUCE_LATENCY_S)
    if not extra:
        return lat
    return LatencyModel(Coeffs(lat.prefill.a + extra, lat.prefill.b, lat.prefill.c),
                        Coeffs(lat.decode.a + extra, lat.decode.b, lat.decode.c), lat.pp)


def kv_capacity_tokens(model: ModelShape, gpu: GPU, tp: int, pp: int) -> int:
    free = gpu.mem_gib * (1 << 30) * tp * pp * 0.9 - model.weight_bytes
    return max(0, int(free / model.kv_bytes_per_token))


def parallel_options(model: ModelShape, gpu: GPU, max_gpus: int, kv_reserve: float = 0.2,
                     max_pp: int = 8, min_kv_tokens: int = 0) -> list[tuple[int, int]]:
    """(tp, pp) pairs that fit the model's weights with kv_reserve of memory left for KV
    (and, with min_kv_tokens, room for at least that many tokens of KV)."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpu.gpus_per_node or model.num_heads % tp or model.num_kv_heads % tp and model.num_kv_heads >= tp:
            continue
        for pp in (1, 2, 4, 8):
            if pp > max_pp or tp * pp > max_gpus or model.num_layers % pp:
                continue
            per_gpu = model.weight_bytes / (tp * pp)
            if per_gpu > gpu.mem_gib * (1 << 30) * (1 - kv_reserve):
                continue
            if kv_capacity_tokens(model, gpu, tp, pp) < min_kv_tokens:
                continue
            out.append((tp, pp))
    return out


def _gpus(key: tuple) -> int:
    """GPUs of one instance: (tp, pp) or ("ae", attention workers, expert workers)."""
    return key[1] + key[2] if key[0] == "ae" else key[0] * key[1]


def _instance(kind: str, model: ModelShape, gpu: GPU, lat: LatencyFn, tp: int, pp: int, node: int = 0,
              budget: int = CHUNKED_BUDGET, prefill_first: bool = False) -> Instance:
    return Instance(kind, lat(tp, pp), node=node, max_batched_tokens=budget, max_num_seqs=MAX_NUM_SEQS,
                    kv_capacity_tokens=kv_capacity_tokens(model, gpu, tp, pp), prefill_first=prefill_first)


def _copy(i: Instance) -> Instance:
    return Instance(i.kind, i.model, i.node, i.max_batched_tokens, i.max_num_seqs, i.kv_capacity_tokens,
                    prefill_first=i.prefill_first, ae=i.ae)


def _p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90)) if xs else float("nan")


_FREE = LatencyModel(Coeffs(0.0, 0.0, 0.0), Coeffs(0.0, 0.0, 0.0))


class _Counter:
    sims = 0


def goodput(make_spec: Callable[[], ClusterSpec], wl: Workload, ttft_s: float, tpot_s: float,
            target: float, guess: float, rel_tol: float = 0.05, max_rate: float = 1e5) -> float:
    """Highest Poisson rate whose SLO attainment stays >= target, by bracketing from a
    guess and bisecting to a relative tolerance. Attainment is monotone in rate (more load
    never helps a request), which makes the bracket valid. 0 when a trickle misses.

    ``max_rate`` is the instance's processing capacity: above it the queue grows without
    bound, so no rate there is sustainable, although a finite run of arrivals can still
    drain within the SLO (TPOT is averaged over a request's tokens, so a backlog of a few
    seconds hides in it)."""
    def ok(rate: float) -> bool:
        _Counter.sims += 1
        return attainment(Simulation(make_spec()).run(wl.requests(rate)), ttft_s, tpot_s) >= target

    guess = max(min(guess, max_rate), 1e-3)
    if ok(guess):
        lo, hi = guess, min(guess * 2, max_rate)
        while hi > lo and ok(hi):
            if hi >= max_rate:
                return hi
            lo, hi = hi, min(hi * 2, max_rate)
    else:
        lo, hi = guess / 2, guess
        while not ok(lo):
            lo, hi = lo / 2, lo
            if lo < guess * 1e-3:
                return 0.0
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _p90s(make_spec: Callable[[], ClusterSpec], wl: Workload, rate: float) -> tuple[float, float]:
    reqs = Simulation(make_spec()).run(wl.requests(max(rate, 1e-3)))
    return _p90([r.ttft_s for r in reqs]), _p90([r.tpot_s for r in reqs])


@dataclass
class PhaseRates:
    """Per-instance goodput of each parallelism, each phase on its own."""

    prefill: dict[tuple[int, int], float]
    decode: dict[tuple[int, int], float]


def search(model: ModelShape, gpu: GPU, num_gpus: int, slo: SLO, wl: Workload,
           lat: LatencyFn | None = None, codec_ratio: float = 1.0, max_pp: int = 1,
           max_unit_gpus: int | None = None, stats: dict[str, object] | None = None,
           attention_expert: bool = False) -> list[Layout]:
    """All layouts kept, best goodput per GPU first (colocated of both kinds, and the
    verified disaggregated units).

    ``max_pp`` is 1 by default: the engine has no pipeline parallelism, and the simulator
    runs one batch at a time per instance (a pipelined instance would keep pp micro-batches
    in flight), so pp>1 would be both unservable and mispriced.

    ``attention_expert`` (MoE models) adds decode instances split into attention and expert
    workers (kind ``disaggregated/ae``), for each attention:expert ratio that fits a node;
    ``plan`` writes it as pools ``attention`` and ``expert`` (placement.plan)."""
    lat = lat or (lambda tp, pp: catalogue_latency(model, gpu, tp, pp))
    link_local = gpu.intra_node_gbps * 1e9
    link_remote = gpu.cross_node_gbps * 1e9
    longest = wl.prompt_range[1] + wl.output_range[1]
    opts = parallel_options(model, gpu, num_gpus, max_pp=max_pp, min_kv_tokens=longest)
    per_node = gpu.gpus_per_node
    max_unit = max_unit_gpus or max(per_node, 16)
    layouts: list[Layout] = []
    sims0 = _Counter.sims
    lat_cache: dict[tuple[int, int], LatencyModel] = {}

    def latc(tp: int, pp: int) -> LatencyModel:
        if (tp, pp) not in lat_cache:
            lat_cache[(tp, pp)] = lat(tp, pp)
        return lat_cache[(tp, pp)]

    def spec(instances: list[Instance], link: bool = True) -> ClusterSpec:
        return ClusterSpec(instances, kv_bytes_per_token=model.kv_bytes_per_token, codec_ratio=codec_ratio,
                           link_bps=(lambda a, b: link_local if a == b else link_remote) if link
                           else (lambda a, b: 1e18))

    def capacity(tp: int, pp: int, phase: str) -> float:
        """Requests/s one instance processes when saturated (prefill: full batches of
        mean prompts; decode: the largest batch memory and max_num_seqs allow, by Little's
        law; colocated: both works on the same GPUs): the bisection's guess and ceiling."""
        lm = latc(tp, pp)
        p, o = wl.mean_prompt, wl.mean_output
        per_batch = max(1, int(PREFILL_BUDGET // p))
        prefill_s = lm.prefill_s([int(p)] * per_batch) / per_batch
        if phase == "prefill":
            return 1.0 / prefill_s
        kv = kv_capacity_tokens(model, gpu, tp, pp)
        batch = max(1.0, min(MAX_NUM_SEQS, kv / (p + o)))
        step = lm.decode_s(int(batch), int(batch * (p + o / 2)))
        dec = batch / (step * o)
        return dec if phase == "decode" else 1.0 / (1.0 / dec + prefill_s)

    # Colocated, both kinds: one instance's goodput, replicated.
    for tp, pp in opts:
        g = tp * pp
        n = num_gpus // g
        for kind, budget, first in COLOCATED_KINDS:
            mk = lambda tp=tp, pp=pp, budget=budget, first=first: spec(  # noqa: E731
                [_instance("colocated", model, gpu, latc, tp, pp, budget=budget, prefill_first=first)])
            cap = capacity(tp, pp, "colocated")
            rate = goodput(mk, wl, slo.ttft_s, slo.tpot_s, slo.attainment, 0.5 * cap, max_rate=CAP_SLACK * cap)
            t90, p90 = _p90s(mk, wl, rate)
            nodes = [i * g // per_node for i in range(n)]
            layouts.append(Layout("colocated", {"colocated": {"tp": tp, "pp": pp, "replicas": n, "nodes": nodes,
                                                              "max_num_batched_tokens": budget}},
                                  n * g, rate * n, t90, p90, kind=kind,
                                  notes=["chunked prefill" if kind.endswith("chunked") else
                                         "whole prompts in their own steps, decodes wait (vLLM <= 0.3)"
                                         if first else "whole prompts beside the decodes"]))

    # Disaggregated. Each phase alone: the other phase is free and the link infinite.
    rates = PhaseRates({}, {})
    cap_p: dict[tuple[int, int], float] = {}
    cap_d: dict[tuple[int, int], float] = {}
    for tp, pp in opts:
        mk_p = lambda tp=tp, pp=pp: spec([_instance("prefill", model, gpu, latc, tp, pp, budget=PREFILL_BUDGET),  # noqa: E731
                                          Instance("decode", _FREE)], link=False)
        cap_p[(tp, pp)] = capacity(tp, pp, "prefill")
        rates.prefill[(tp, pp)] = goodput(mk_p, wl, slo.ttft_s, 1e9, slo.attainment, 0.5 * cap_p[(tp, pp)],
                                          max_rate=CAP_SLACK * cap_p[(tp, pp)])
        mk_d = lambda tp=tp, pp=pp: spec([Instance("prefill", _FREE, max_batched_tokens=1 << 30),  # noqa: E731
                                          _instance("decode", model, gpu, latc, tp, pp)], link=False)
        cap_d[(tp, pp)] = capacity(tp, pp, "decode")
        rates.decode[(tp, pp)] = goodput(mk_d, wl, 1e9, slo.tpot_s, slo.attainment, 0.5 * cap_d[(tp, pp)],
                                         max_rate=CAP_SLACK * cap_d[(tp, pp)])

    def dec_instance(key: tuple, node: int = 0) -> Instance:
        if key[0] != "ae":
            return _instance("decode", model, gpu, latc, *key, node=node)
        return Instance("ae_decode", latc(1, 1), node=node, max_num_seqs=MAX_NUM_SEQS,
                        kv_capacity_tokens=ae_kv_capacity_tokens(model, gpu, key[1]), ae=ae_models[key])

    ae_models: dict[tuple, AttentionExpert] = {}
    if attention_expert:
        for key in ae_options(model, gpu, num_gpus, longest):
            ae_models[key] = ae_roofline(model, gpu, key[1], key[2])
            cap_d[key] = ae_capacity(ae_models[key], ae_kv_capacity_tokens(model, gpu, key[1]),
                                     wl.mean_prompt, wl.mean_output, MAX_NUM_SEQS)
            mk_d = lambda key=key: spec([Instance("prefill", _FREE, max_batched_tokens=1 << 30),  # noqa: E731
                                         dec_instance(key)], link=False)
            rates.decode[key] = goodput(mk_d, wl, 1e9, slo.tpot_s, slo.attainment, 0.5 * cap_d[key],
                                        max_rate=CAP_SLACK * cap_d[key])

    pairs = []
    for cp, rp in rates.prefill.items():
        for cd, rd in rates.decode.items():
            if rp > 0 and rd > 0:
                gp, gd = _gpus(cp), _gpus(cd)
                pairs.append((1.0 / (gp / rp + gd / rd), cp, cd))
    pairs.sort(reverse=True)
    best = 0.0
    verified = pruned = 0
    # The bound assumes the two phases in the exact ratio; a unit of several instances
    # behind one router also pools their queues, which can lift it a little above, so the
    # bound is taken with a small slack.
    slack = 1.03
    # The best pair of each decode kind is verified whatever its bound, so that every
    # kind has a layout to show beside the winner.
    kinds_seen: set[bool] = set()
    for bound, cp, cd in pairs:
        is_ae = cd[0] == "ae"
        first_of_kind = is_ae not in kinds_seen
        kinds_seen.add(is_ae)
        if bound * slack < best and not first_of_kind:
            pruned += 1
            continue
        rp, rd = rates.prefill[cp], rates.decode[cd]
        gp, gd = _gpus(cp), _gpus(cd)
        # Integer mixes near the balancing ratio, within one unit's GPU budget.
        mixes = []
        for n_p in range(1, max_unit // gp + 1):
            for n_d in {max(1, math.floor(n_p * rp / rd)), max(1, math.ceil(n_p * rp / rd))}:
                g = n_p * gp + n_d * gd
                if g <= min(num_gpus, max_unit):
                    mixes.append((min(n_p * rp, n_d * rd) / g, n_p, n_d))
        if not mixes:
            continue
        mixes.sort(reverse=True)
        for pred, n_p, n_d in mixes[:2]:
            if pred * slack < best and not first_of_kind:
                continue
            g = n_p * gp + n_d * gd
            placed = place_units([gp] * n_p + [gd] * n_d, 1, per_node, math.ceil(num_gpus / per_node))
            if placed is None:
                continue
            nodes = placed[0]
            insts = ([_instance("prefill", model, gpu, latc, *cp, node=nodes[i], budget=PREFILL_BUDGET)
                      for i in range(n_p)]
                     + [dec_instance(cd, node=nodes[n_p + i]) for i in range(n_d)])
            mk = lambda insts=insts: spec([_copy(i) for i in insts])  # noqa: E731
            cap = min(n_p * cap_p[cp], n_d * cap_d[cd])
            rate = goodput(mk, wl, slo.ttft_s, slo.tpot_s, slo.attainment, 0.85 * pred * g,
                           max_rate=CAP_SLACK * cap)
            verified += 1
            t90, p90 = _p90s(mk, wl, rate)
            decode: dict[str, object] = (
                {"tp": cd[0], "pp": cd[1], "replicas": n_d, "nodes": nodes[n_p:]} if cd[0] != "ae" else
                {"attention_workers": cd[1], "expert_workers": cd[2], "gpus": gd, "replicas": n_d,
                 "nodes": nodes[n_p:]})
            unit = Layout("disaggregated",
                          {"prefill": {"tp": cp[0], "pp": cp[1], "replicas": n_p, "nodes": nodes[:n_p]},
                           "decode": decode},
                          g, rate, t90, p90, kind="disaggregated/ae" if cd[0] == "ae" else "disaggregated",
                          notes=[f"unit of {n_p} prefill + {n_d} decode, bound {bound:.3f}/GPU"])
            lay = replicate(unit, num_gpus, per_node)
            if lay is None:
                continue
            layouts.append(lay)
            best = max(best, lay.goodput_per_gpu)
    layouts.sort(key=lambda lay: lay.goodput_per_gpu, reverse=True)
    if stats is not None:
        stats.update({"options": opts, "phase_rates": rates, "pairs": len(pairs), "pairs_pruned": pruned,
                      "units_verified": verified, "simulations": _Counter.sims - sims0})
    return layouts


def meets(layout: Layout, slo: SLO) -> bool:
    return layout.goodput_rps > 0 and not math.isnan(layout.ttft_p90_s)
