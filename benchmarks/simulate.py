"""`bench --simulate`: the same sweep (same arrivals, same lengths, same metrics) run in the
placement simulator instead of on Ray, for node counts and GPU types this machine does
not have. Rows are labelled simulated (layout "NAME (simulated GPU)", config.simulated).

Per node count N, the manifest's layout is copied N times, copy i on node i (as the
fake-node sweep does); each replica is an instance with the manifest's token budget,
batch limit and KV blocks, and step times from the roofline latency model of the GPU type
(placement.latency). KV crosses the GPU's intra-node link within a node and its
cross-node link between nodes. Accelerators are GPUs: replicas x tp per copy.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks.metrics import RequestRecord
from benchmarks.runner import BenchConfig, Collector
from benchmarks.workload import RequestSpec, trace_rate


def _cluster(manifest: Any, gpu_name: str, nodes: int) -> tuple[Any, float]:
    from placement.catalogue import ModelShape, gpu
    from placement.latency import roofline
    from placement.simulator import ClusterSpec, Instance

    g = gpu(gpu_name)
    bytes_per_param = 4 if manifest.model.dtype == "float32" else 2
    shape = ModelShape.from_dir(manifest.model_dir(), bytes_per_param=bytes_per_param)
    instances = []
    for node in range(nodes):
        if manifest.afd:
            # The attention and expert pools together are one decode instance whose step
            # the simulator takes from their ping-pong (placement.latency.AttentionExpert).
            from placement.attention_expert import ae_roofline

            att, ex = manifest.pools["attention"], manifest.pools["expert"]
            instances.append(Instance(
                "ae_decode", roofline(shape, g, tp=1), node=node, max_num_seqs=att.max_num_seqs * att.replicas,
                kv_capacity_tokens=att.replicas * att.num_kv_blocks * manifest.kv_cache.block_size,
                ae=ae_roofline(shape, g, att.replicas, ex.replicas, int(ex.micro_batches or 2))))
        for kind, pool in manifest.pools.items():
            if kind in ("attention", "expert"):
                continue
            for _ in range(pool.replicas):
                instances.append(Instance(
                    kind, roofline(shape, g, tp=pool.tp), node=node,
                    max_batched_tokens=pool.max_num_batched_tokens, max_num_seqs=pool.max_num_seqs,
                    kv_capacity_tokens=pool.num_kv_blocks * manifest.kv_cache.block_size))

    def link_bps(a: int, b: int) -> float:
        return (g.intra_node_gbps if a == b else g.cross_node_gbps) * 1e9

    spec = ClusterSpec(instances, kv_bytes_per_token=shape.kv_bytes_per_token, link_bps=link_bps)
    gpus = nodes * sum(p.replicas * p.tp for p in manifest.pools.values())
    return spec, float(gpus)


def _prompt_len(spec: RequestSpec) -> int:
    if spec.prompt_tokens:
        return spec.prompt_tokens
    return max(1, len(str(spec.prompt).split()))  # text prompt: about a token a word


def simulate_rate(manifest: Any, gpu_name: str, nodes: int, cfg: BenchConfig,
                  rate: float | None) -> list[RequestRecord]:
    from placement.simulator import SimRequest, Simulation

    specs = cfg.requests(rate)
    label = rate if rate is not None else round(trace_rate(cfg.trace or specs), 4)
    cluster, _ = _cluster(manifest, gpu_name, nodes)  # instances hold state: fresh per run
    sims = [SimRequest(s.arrival_s, _prompt_len(s), s.output_tokens) for s in specs]
    Simulation(cluster).run(sims)
    out = []
    for s, r in zip(specs, sims):
        done = math.isfinite(r.finish_s) and math.isfinite(r.first_token_s)
        e2e = r.finish_s - r.arrival_s if done else None
        timed_out = e2e is not None and e2e > cfg.timeout_s
        ok = done and not timed_out
        out.append(RequestRecord(
            rate=label, nodes=nodes, arrival_s=round(s.arrival_s, 6), prompt_tokens=r.prompt_tokens,
            output_tokens=r.output_tokens if ok else 0,
            ttft_s=round(r.ttft_s, 6) if ok else None, tpot_s=round(r.tpot_s, 6) if ok else None,
            e2e_s=round(e2e, 6) if e2e is not None else None, ok=ok,
            error=None if ok else ("timeout (simulated)" if timed_out else "not finished in the simulation")))
    return out


def sweep(manifest: Any, gpu_name: str, node_counts: list[int], cfg: BenchConfig,
          col: Collector) -> dict[str, Any]:
    col.gpu_unit = "gpu"
    col.simulated = True
    for n in node_counts:
        _, gpus = _cluster(manifest, gpu_name, n)
        col.gpus[str(n)] = gpus
        col.deployments.append({"nodes": n, "simulated": True, "gpu_type": gpu_name,
                                "workers": {k: [f"node{i}" for i in range(n) for _ in range(p.replicas)]
                                            for k, p in manifest.pools.items()}})
        for rate in cfg.run_rates():
            col.records.extend(simulate_rate(manifest, gpu_name, n, cfg, rate))
    s = col.write()
    return s
