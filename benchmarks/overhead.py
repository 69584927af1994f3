"""Serving-overhead benchmark (issues 3, 17), side by side in one process tree, as ratios:

1. served TPOT / the engine's own decode step time at 1 and 8 concurrent streams (target
   <= 1.1), for the ingress's two paths to the workers, interleaved in one deployment:
   its channels (cluster/channel.py) and Ray calls (SPLITSERVE_CHANNEL=0);
2. dispatch per request (max_tokens=1, from the Server-Timing header): the ingress's own
   code + the prefill call beyond the worker's own queue + compute time (target p50
   <= 1 ms), the call split into its way in, the KV publish before the reply, its way back;
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


def _prompt(i: int) -> list[int]:
    return [3 + (i * 7 + k) % 500 for k in range(32)]


def engine_decode_step_s(model_dir: str, steps: int, batch: int = 1) -> float:
    """Median decode step time of the engine alone at a batch of `batch` requests (one
    torch thread, as a worker), prompts as the served runs send."""
    from engine.engine import LLMEngine
    from engine.sequence import SamplingParams

    torch.set_num_threads(1)
    eng = LLMEngine.from_model_dir(model_dir, num_blocks=512, block_size=16)
    for i in range(batch):
        eng.add_request(f"r{i}", _prompt(i), SamplingParams(temperature=0, max_tokens=steps + 2,
                                                            ignore_eos=True))
    while any(not s.output_token_ids for s in list(eng.scheduler.waiting) + list(eng.scheduler.running)):
        eng.step()  # prefills
    eng.step()  # warm-up decode
    times = []
    while eng.has_work:
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _one_stream(url: str, body: dict[str, Any]) -> float:
    import httpx

    stamps: list[float] = []
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    n = len(json.loads(line[6:])["choices"][0].get("token_ids") or [1])
                    stamps += [time.perf_counter()] * n
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def served_tpot_s(url: str, tokens: int, streams: int = 1) -> float:
    """Median TPOT of `streams` concurrent streamed requests (closed loop, one round)."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"model": "demo", "prompt": _prompt(i), "max_tokens": tokens, "stream": True,
               "ignore_eos": True, "temperature": 0, "return_token_ids": True} for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        return statistics.median(pool.map(lambda b: _one_stream(url, b), bodies))


def load_avg() -> float:
    import os

    return os.getloadavg()[0]


def ingress_overhead_s(url: str, n: int) -> dict[str, list[float]]:
    """Per single-token request, from the server's Server-Timing header and the client's
    clock: "ingress" is the ingress process's own code (validation, routing, response);
    "rpc" the Ray round trip to the prefill worker beyond its own time; "outside" the
    client's end-to-end minus the worker's time (adds HTTP and the client)."""
    import httpx

    out: dict[str, list[float]] = {"ingress": [], "rpc": [], "outside": [], "rpc_in": [], "publish": [],
                                   "rpc_out": []}
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
                for k in ("rpc", "rpc_in", "publish", "rpc_out"):
                    out[k].append(timing[k] / 1e3)
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
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of the two paths (channel, Ray) per figure")
    ap.add_argument("--streams", default="1,8", help="concurrent streams for the TPOT figures")
    ap.add_argument("--skip-kv", action="store_true", help="leave out the KV transfer figure")
    args = ap.parse_args(argv)
    streams = [int(x) for x in args.streams.split(",")]

    from cluster.manifest import load_manifest
    from cluster.serve import Server, deploy, init_ray

    manifest = load_manifest(args.manifest)
    # Closed-loop streams on a shared machine: measure them, do not refuse them (429s).
    manifest.server.ttft_admission = False
    model_dir = str(manifest.model_dir())
    started = init_ray(num_cpus=4)
    dep = deploy(manifest)
    server = Server(dep)
    try:
        url = server.start()
        gen = dep.ingress.gen
        channels = gen.channels
        paths = {"channel": channels, "ray": None}  # the Ray path: SPLITSERVE_CHANNEL=0
        steps = {b: engine_decode_step_s(model_dir, args.tokens, b) for b in streams}
        tpots: dict[str, dict[int, list[float]]] = {p: {b: [] for b in streams} for p in paths}
        overs: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
        for pool in paths.values():  # warm-up: first requests of each path (channels open)
            gen.channels = pool
            served_tpot_s(url, 8, max(streams))
        loads: list[float] = [load_avg()]
        # Interleaved A B A B: the machine is shared and its load drifts.
        for _ in range(args.rounds):
            for name, pool in paths.items():
                gen.channels = pool
                for b in streams:
                    tpots[name][b].append(served_tpot_s(url, args.tokens, b))
                for k, v in ingress_overhead_s(url, max(5, args.requests // args.rounds)).items():
                    overs[name].setdefault(k, []).extend(v)
                loads.append(load_avg())
        gen.channels = channels
        kv = None if args.skip_kv else kv_transfer_ratio(args.kv_mb << 20, runs=5)
    finally:
        server.stop()
        dep.stop()
        if started:
            ray.shutdown()
    def p50_ms(xs: list[float]) -> float:
        return statistics.median(xs) * 1e3

    res: dict[str, Any] = {"manifest": args.manifest, "tokens": args.tokens, "rounds": args.rounds,
                           "load_avg_1m": loads,
                           "engine_decode_step_ms": {b: steps[b] * 1e3 for b in streams}, "paths": {}}
    for name in paths:
        o = overs[name]
        res["paths"][name] = {
            "served_tpot_ms": {b: p50_ms(tpots[name][b]) for b in streams},
            "tpot_ratio": {b: statistics.median(tpots[name][b]) / steps[b] for b in streams},
            "tpot_ratio_rounds": {b: [t / steps[b] for t in tpots[name][b]] for b in streams},
            "ingress_router_p50_ms": p50_ms(o["ingress"]),
            "ingress_router_p90_ms": sorted(o["ingress"])[int(0.9 * len(o["ingress"]))] * 1e3,
            "prefill_call_p50_ms": p50_ms(o["rpc"]),
            "prefill_call_in_p50_ms": p50_ms(o["rpc_in"]),
            "prefill_call_publish_p50_ms": p50_ms(o["publish"]),
            "prefill_call_out_p50_ms": p50_ms(o["rpc_out"]),
            "dispatch_p50_ms": p50_ms([a + b for a, b in zip(o["ingress"], o["rpc"])]),
            "client_e2e_minus_worker_p50_ms": p50_ms(o["outside"]),
        }
    res["kv_transfer"] = kv
    res["targets"] = {"tpot_ratio": "<= 1.1", "dispatch_p50_ms": "<= 1 (ingress + router + prefill call)",
                      "kv_ratio": ">= 0.5"}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
