"""Serving-overhead benchmark (issue 3), side by side in one process tree, as ratios:

1. served TPOT / the engine's own decode step time at batch 1 (target <= 1.15);
2. ingress + router overhead per request: client end-to-end time of a max_tokens=1
   request minus the prefill worker's own queue + compute time (target p50 <= 2 ms);
3. KV transfer throughput on one node (prefill actor -> object store -> decode actor,
   including the write into the paged cache) relative to a plain memory copy of the same
   bytes (target >= 0.5).

    python -m benchmarks.overhead --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import cluster  # noqa: F401 - Ray environment
import ray
import torch


def engine_decode_step_s(model_dir: str, steps: int) -> float:
    """Mean decode step time of the engine alone at batch 1 (one torch thread, as a worker)."""
    from engine.engine import LLMEngine
    from engine.sequence import SamplingParams

    torch.set_num_threads(1)
    eng = LLMEngine.from_model_dir(model_dir, num_blocks=256, block_size=16)
    eng.add_request("r", list(range(3, 35)), SamplingParams(temperature=0, max_tokens=steps + 2,
                                                            ignore_eos=True))
    eng.step()  # prefill
    eng.step()  # warm-up decode
    times = []
    while eng.has_work:
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def served_tpot_s(url: str, tokens: int, runs: int) -> float:
    import httpx

    tpots = []
    body = {"model": "demo", "prompt": list(range(3, 35)), "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=120) as client:
        for _ in range(runs):
            stamps = []
            with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        n = len(json.loads(line[6:])["choices"][0].get("token_ids") or [1])
                        stamps += [time.perf_counter()] * n
            tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return statistics.median(tpots)


def ingress_overhead_s(url: str, n: int) -> dict[str, list[float]]:
    """Per single-token request, from the server's Server-Timing header and the client's
    clock: "ingress" is the ingress process's own code (validation, routing, response);
    "rpc" the Ray round trip to the prefill worker beyond its own time; "outside" the
    client's end-to-end minus the worker's time (adds HTTP and the client)."""
    import httpx

    out: dict[str, list[float]] = {"ingress": [], "rpc": [], "outside": []}
    with httpx.Client(timeout=60) as client:
        for i in range(n + 5):
            prompt = [3 + (i % 50), 7 + (i % 13)] * 8
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/completions", json={"model": "demo", "prompt": prompt,
                                                           "max_tokens": 1, "temperature": 0})
            e2e = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            timing = {part.split(";")[0].strip(): float(part.split("dur=")[1])
                      for part in r.headers["server-timing"].split(",")}
            if i >= 5:  # warm-up
                out["outside"].append(e2e - timing["worker"] / 1e3)
                out["ingress"].append(timing["ingress"] / 1e3)
                out["rpc"].append(timing["rpc"] / 1e3)
    return out


@ray.remote(num_cpus=0)
class _KVSender:
    def send(self, nbytes: int) -> tuple[Any, float]:
        from kvtransfer.connector import ObjectStoreConnector

        kv = torch.randn(4, 2, nbytes // (4 * 2 * 2 * 16 * 4), 2, 16)
        t0 = time.perf_counter()
        h = ObjectStoreConnector().send("bench", kv)
        return h, time.perf_counter() - t0


@ray.remote(num_cpus=0)
class _KVReceiver:
    def __init__(self) -> None:
        self.cache = [torch.zeros(2, 8192, 16, 2, 16) for _ in range(4)]

    def receive(self, handle: Any) -> float:
        from engine.runner import ModelRunner
        from kvtransfer.connector import ObjectStoreConnector

        t0 = time.perf_counter()
        kv = ObjectStoreConnector().receive(handle, timeout_s=60)
        runner = ModelRunner(torch.nn.Identity(), self.cache, 16)
        runner.import_kv(list(range(kv.shape[2] // 16 + 1)), kv)
        return time.perf_counter() - t0


def kv_transfer_ratio(nbytes: int, runs: int) -> dict[str, float]:
    sender, receiver = _KVSender.remote(), _KVReceiver.remote()
    ts = []
    for _ in range(runs):
        handle, send_s = ray.get(sender.send.remote(nbytes))
        recv_s = ray.get(receiver.receive.remote(handle))
        ts.append(send_s + recv_s)
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    t, c = statistics.median(ts), statistics.median(copies)
    return {"bytes": nbytes, "transfer_s": t, "memcpy_s": c, "transfer_gbps": nbytes / t / 1e9,
            "memcpy_gbps": nbytes / c / 1e9, "ratio": c / t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per TPOT run")
    ap.add_argument("--requests", type=int, default=50, help="requests for the overhead figure")
    ap.add_argument("--kv-mb", type=int, default=64, help="KV size for the transfer figure")
    ap.add_argument("--manifest", default="deploy/manifests/demo.yaml",
                    help="disaggregated manifest to serve (its model is served as 'demo')")
    args = ap.parse_args(argv)

    from cluster.manifest import load_manifest
    from cluster.serve import Server, deploy, init_ray

    manifest = load_manifest(args.manifest)
    model_dir = str(manifest.model_dir())
    started = init_ray(num_cpus=4)
    dep = deploy(manifest)
    server = Server(dep)
    try:
        url = server.start()
        step_s = engine_decode_step_s(model_dir, args.tokens)
        tpot_s = served_tpot_s(url, args.tokens, runs=5)
        over = ingress_overhead_s(url, args.requests)
        kv = kv_transfer_ratio(args.kv_mb << 20, runs=5)
    finally:
        server.stop()
        dep.stop()
        if started:
            ray.shutdown()
    res = {
        "manifest": args.manifest,
        "engine_decode_step_ms": step_s * 1e3,
        "served_tpot_ms": tpot_s * 1e3,
        "tpot_ratio": tpot_s / step_s,
        "ingress_router_p50_ms": statistics.median(over["ingress"]) * 1e3,
        "ingress_router_p90_ms": sorted(over["ingress"])[int(0.9 * len(over["ingress"]))] * 1e3,
        "ray_rpc_p50_ms": statistics.median(over["rpc"]) * 1e3,
        "client_e2e_minus_worker_p50_ms": statistics.median(over["outside"]) * 1e3,
        "kv_transfer": kv,
        "targets": {"tpot_ratio": "<= 1.15", "ingress_router_p50_ms": "<= 2", "kv_ratio": ">= 0.5"},
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
