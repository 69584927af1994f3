"""`splitserve plan`: fill a manifest's layout (mode, pools: replicas, tp, nodes) with the
best layout the search finds for its hardware, workload and SLO, and predict its goodput.

Only this module turns a layout into placements (``pools.*.nodes``); tensor-parallel
ranks follow their rank 0 onto the same node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from placement.catalogue import GPU, ModelShape, gpu as gpu_type
from placement.latency import LatencyModel
from placement.search import (MAX_NUM_SEQS, NOT_SERVABLE, PREFILL_BUDGET, SLO, Layout, Workload, best_of_kind,
                              catalogue_latency, parallel_options, search)


class PlanError(ValueError):
    """Input the planner cannot work with (exit 2)."""


@dataclass
class Plan:
    layout: Layout
    manifest: dict[str, Any]
    slo: SLO
    # (field, predicted p90, target) for each SLO the best layout misses.
    misses: list[tuple[str, float, float]]
    # The best layout of each kind (disaggregated, colocated/chunked, colocated/whole, for
    # MoE models disaggregated/ae, and, predicted only (search.NOT_SERVABLE),
    # colocated/prefill-first).
    alternatives: dict[str, Layout] | None = None

    def summary(self) -> dict[str, Any]:
        def pools(lay: Layout) -> dict[str, Any]:
            return {name: {k: v for k, v in spec.items() if k != "nodes"} for name, spec in lay.pools.items()}

        return {"mode": self.layout.mode, "kind": self.layout.kind, "pools": self.layout.pools,
                "gpus": self.layout.gpus,
                "predicted_goodput_rps": self.layout.goodput_rps,
                "predicted_goodput_per_gpu": self.layout.goodput_per_gpu,
                "predicted_ttft_p90_ms": self.layout.ttft_p90_s * 1e3,
                "predicted_tpot_p90_ms": self.layout.tpot_p90_s * 1e3,
                "best_of_each_kind": {k: {"goodput_per_gpu": lay.goodput_per_gpu, "gpus": lay.gpus,
                                          "pools": pools(lay), "servable": k not in NOT_SERVABLE}
                                      for k, lay in (self.alternatives or {}).items()},
                "slo_misses": [{"field": f, "predicted_ms": p * 1e3, "target_ms": t * 1e3}
                               for f, p, t in self.misses]}


def make_plan(manifest: Any) -> Plan:
    hw = manifest.hardware
    if hw is None:
        raise PlanError("hardware: missing; the planner needs hardware.gpu and hardware.num_gpus")
    try:
        g: GPU = gpu_type(hw.gpu)
    except ValueError as e:
        raise PlanError(f"hardware.gpu: {e}") from None
    if hw.gpus_per_node:
        g = GPU(**{**g.__dict__, "gpus_per_node": hw.gpus_per_node})
    bytes_per_param = 4 if manifest.model.dtype == "float32" else 2
    shape = ModelShape.from_dir(manifest.model_dir(), bytes_per_param=bytes_per_param)
    longest = manifest.workload.prompt_tokens[1] + manifest.workload.output_tokens[1]
    if not parallel_options(shape, g, hw.num_gpus, max_pp=1, min_kv_tokens=longest):
        need = shape.weight_bytes / (1 << 30)
        tp_max = min(hw.num_gpus, g.gpus_per_node)
        raise PlanError(f"hardware.num_gpus: {hw.num_gpus} x {g.name} ({g.mem_gib} GiB each, at most "
                        f"{tp_max} per instance) cannot hold the model's {need:.1f} GiB of weights with room "
                        f"for KV of one {longest}-token request (workload); add GPUs or pick a larger GPU")
    profiled: LatencyModel | None = None
    if hw.profile:
        from placement.profile import load_profile

        p = Path(hw.profile)
        profiled = load_profile(p if p.is_absolute() else Path(manifest.base_dir) / p)

    def lat(tp: int, pp: int) -> LatencyModel:
        if profiled is None:
            return catalogue_latency(shape, g, tp, pp)
        # A profile holds one instance's coefficients; scale by parallelism as the roofline does.
        base, par = catalogue_latency(shape, g, 1, 1), catalogue_latency(shape, g, tp, pp)
        def scale(c: Any, b: Any, q: Any) -> Any:
            return type(c)(*(x * (y / z if z else 1.0) for x, y, z in zip(c.as_tuple(), q.as_tuple(), b.as_tuple())))
        return LatencyModel(scale(profiled.prefill, base.prefill, par.prefill),
                            scale(profiled.decode, base.decode, par.decode), pp)

    slo = SLO(manifest.slo.ttft_ms / 1e3, manifest.slo.tpot_ms / 1e3, manifest.slo.attainment)
    # At most 2000 requests per simulated run: at high rates the arrivals then span less
    # than a minute, but the search stays within seconds per parallelism.
    wl = Workload(tuple(manifest.workload.prompt_tokens), tuple(manifest.workload.output_tokens),  # type: ignore[arg-type]
                  num_requests=300, max_requests=2000)
    # MoE: attention/expert decode is scored too; only layouts that `serve` can realise
    # are chosen and written.
    every = search(shape, g, hw.num_gpus, slo, wl, lat=lat, attention_expert=shape.num_experts > 0)
    layouts = [lay for lay in every if lay.kind not in NOT_SERVABLE]
    best = layouts[0]
    misses = []
    if best.goodput_rps <= 0:
        # No layout meets the SLO at any rate: the one that comes closest (its worse ratio
        # of predicted p90 to target), and what it misses by.
        best = min(layouts, key=lambda lay: max(lay.ttft_p90_s / slo.ttft_s, lay.tpot_p90_s / slo.tpot_s))
        if not best.ttft_p90_s <= slo.ttft_s:
            misses.append(("slo.ttft_ms", best.ttft_p90_s, slo.ttft_s))
        if not best.tpot_p90_s <= slo.tpot_s:
            misses.append(("slo.tpot_ms", best.tpot_p90_s, slo.tpot_s))
    return Plan(best, planned_manifest(manifest, best, g), slo, misses, best_of_kind(every))


def planned_manifest(manifest: Any, layout: Layout, g: GPU) -> dict[str, Any]:
    data = manifest.model_dump(mode="json", exclude_none=True)
    data.pop("base_dir", None)
    model = data["model"]
    if "path" in model and not Path(model["path"]).is_absolute():
        model["path"] = str((Path(manifest.base_dir) / model["path"]).resolve())
    if data.get("hardware", {}).get("profile") and not Path(data["hardware"]["profile"]).is_absolute():
        data["hardware"]["profile"] = str((Path(manifest.base_dir) / data["hardware"]["profile"]).resolve())
    ips = manifest.hardware.node_ips
    pools: dict[str, Any] = {}
    if layout.kind == "disaggregated/ae":
        pools.update(_ae_pools(manifest, layout, g, ips))
    for name, spec in layout.pools.items():
        if name in pools or (layout.kind == "disaggregated/ae" and name == "decode"):
            continue
        old = dict(manifest.pools.get(name, {}) and manifest.pools[name].model_dump(exclude_none=True))
        pool = {**old, "replicas": int(spec["replicas"]), "tp": int(spec["tp"])}  # type: ignore[call-overload]
        # The step budget and batch the prediction assumed (colocated: chunked or whole).
        if name == "colocated":
            pool["max_num_batched_tokens"] = int(spec.get("max_num_batched_tokens", PREFILL_BUDGET))  # type: ignore[call-overload]
        elif name == "prefill":
            pool["max_num_batched_tokens"] = PREFILL_BUDGET
        if name != "prefill":
            pool["max_num_seqs"] = MAX_NUM_SEQS
        if g.name != "cpu":
            pool["num_gpus"] = 1
        nodes = spec.get("nodes")
        if ips and nodes is None:  # colocated: replicas fill nodes in order
            nodes = [(i * int(spec["tp"]) * int(spec["pp"])) // g.gpus_per_node  # type: ignore[call-overload]
                     for i in range(int(spec["replicas"]))]  # type: ignore[call-overload]
        if ips and nodes is not None:
            reps = int(spec["replicas"])  # type: ignore[call-overload]
            idx = [nodes[i % len(nodes)] for i in range(reps)]  # type: ignore[index]
            if max(idx) >= len(ips):
                raise PlanError(f"hardware.node_ips: the plan uses {max(idx) + 1} nodes, {len(ips)} listed")
            pool["nodes"] = [ips[i] for i in idx]
        pools[name] = pool
    data["mode"] = layout.mode
    data["pools"] = pools
    return data


def grouped_placement(num_layers: int, num_experts: int, per_group: int, groups: int) -> list[list[list[int]]]:
    """Expert placement of ``groups`` attention/expert groups of ``per_group`` expert workers
    each, as one expert pool: worker w holds the contiguous block (w mod per_group) of
    experts, so every expert has one replica per group (engine.afd routes to the nearest,
    then least loaded replica: a group's own on its node)."""
    block = [[e for e in range(num_experts) if e * per_group // num_experts == s] for s in range(per_group)]
    return [[list(block[w % per_group]) for w in range(per_group * groups)] for _ in range(num_layers)]


def _ae_pools(manifest: Any, layout: Layout, g: GPU, ips: list[str] | None) -> dict[str, Any]:
    """An attention/expert layout (search kind ``disaggregated/ae``: ``replicas`` groups of
    ``attention_workers`` + ``expert_workers`` GPUs) as pools ``attention`` and ``expert``:
    all groups' workers in one M:N pool each, every expert replicated once per group, each
    group's workers on its node."""
    from engine.config import ModelConfig

    d = layout.pools["decode"]
    groups, na, ne = int(d["replicas"]), int(d["attention_workers"]), int(d["expert_workers"])  # type: ignore[call-overload]
    cfg = ModelConfig.from_dir(manifest.model_dir())  # a built-in is built (cached) by the manifest's load
    layers, experts = cfg.num_hidden_layers, cfg.num_local_experts

    def pool(name: str, replicas: int, per_group: int) -> dict[str, Any]:
        old = manifest.pools.get(name)
        out: dict[str, Any] = {**(old.model_dump(exclude_none=True) if old is not None else {}),
                               "replicas": replicas, "tp": 1}
        if g.name != "cpu":
            out["num_gpus"] = 1
        nodes = d.get("nodes")
        if ips and nodes is not None:
            idx = [nodes[i // per_group % len(nodes)] for i in range(replicas)]  # type: ignore[index, arg-type]
            if max(idx) >= len(ips):
                raise PlanError(f"hardware.node_ips: the plan uses {max(idx) + 1} nodes, {len(ips)} listed")
            out["nodes"] = [ips[i] for i in idx]
        return out

    attention = {**pool("attention", groups * na, na), "max_num_seqs": MAX_NUM_SEQS}
    expert = {**pool("expert", groups * ne, ne), "placement": grouped_placement(layers, experts, ne, groups)}
    expert.setdefault("micro_batches", 2)
    return {"attention": attention, "expert": expert}


def write_plan(plan: Plan, out: str | Path) -> None:
    Path(out).write_text(yaml.safe_dump(plan.manifest, sort_keys=False))
