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
4. admit stall: the decode worker's longest step around a request's arrival over its
   median step, KV written on the engine thread vs into reserved blocks off it
   (benchmarks/admit_stall.py; target <= 1.2). The KV figure (3) compares the object store
   with the prefill worker's shared-memory arena, interleaved, on KV of the model's shape.

    python -m benchmarks.overhead --json [--parts kv,stall]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import cluster  # noqa: F401 - Ray environment
import ray
import torch

from benchmarks.overhead_kv import kv_transfer_ratio


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


def _tpot_round(url: str, tokens: int, streams: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"model": "demo", "prompt": _prompt(i), "max_tokens": tokens, "stream": True,
               "ignore_eos": True, "temperature": 0, "return_token_ids": True} for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        return statistics.median(pool.map(lambda b: _one_stream(url, b), bodies))


# The HTTP clients run in a process of their own (as a real client does): in the driver,
# which also runs the ingress (cluster.serve.Server, a thread), their JSON parsing would
# share the ingress's GIL (sessions 8 and before did that).
_CLIENT: Any = None


def _client() -> Any:
    global _CLIENT
    if _CLIENT is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _CLIENT = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return _CLIENT


def served_tpot_s(url: str, tokens: int, streams: int = 1) -> float:
    """Median TPOT of `streams` concurrent streamed requests (closed loop, one round), from
    a client process."""
    return float(_client().submit(_tpot_round, url, tokens, streams).result(timeout=600))


def load_avg() -> float:
    import os

    return os.getloadavg()[0]


def ingress_overhead_s(url: str, n: int) -> dict[str, list[float]]:
    """ingress_overhead_in_process in the client process."""
    return _client().submit(ingress_overhead_in_process, url, n).result(timeout=600)  # type: ignore[no-any-return]


def ingress_overhead_in_process(url: str, n: int) -> dict[str, list[float]]:
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


def _paths(dep: Any, url: str, args: Any, streams: list[int], model_dir: str, parts: set[str],
           trace: tuple[Any, int] | None = None) -> dict[str, Any]:
    """Served TPOT / engine step and dispatch for the ingress's two paths to the workers,
    interleaved A B A B (the machine is shared and its load drifts): its channels and Ray
    calls (the path SPLITSERVE_CHANNEL=0 keeps)."""
    gen = dep.ingress.gen
    channels = gen.channels
    paths = {"channel": channels, "ray": None}
    steps = {b: engine_decode_step_s(model_dir, args.tokens, b) for b in streams} if "tpot" in parts else {}
    tpots: dict[str, dict[int, list[float]]] = {p: {b: [] for b in steps} for p in paths}
    windows: dict[str, dict[int, list[tuple[float, float]]]] = {p: {b: [] for b in steps} for p in paths}
    overs: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
    try:
        for pool in paths.values():  # warm-up: first requests of each path (channels open)
            gen.channels = pool
            served_tpot_s(url, 8, max(streams))
        loads: list[float] = [load_avg()]
        for _ in range(args.rounds):
            for name, pool in paths.items():
                gen.channels = pool
                for b in steps:
                    t0 = time.time()
                    tpots[name][b].append(served_tpot_s(url, args.tokens, b))
                    windows[name][b].append((t0, time.time()))
                if "dispatch" in parts:
                    for k, v in ingress_overhead_s(url, max(5, args.requests // args.rounds)).items():
                        overs[name].setdefault(k, []).extend(v)
                loads.append(load_avg())
    finally:
        gen.channels = channels

    def p50_ms(xs: list[float]) -> float:
        return statistics.median(xs) * 1e3

    out: dict[str, Any] = {"tokens": args.tokens, "rounds": args.rounds, "load_avg_1m": loads,
                           "engine_decode_step_ms": {b: steps[b] * 1e3 for b in steps}, "paths": {}}
    for name in paths:
        fig: dict[str, Any] = {}
        if steps:
            fig.update({"served_tpot_ms": {b: p50_ms(tpots[name][b]) for b in steps},
                        "tpot_ratio": {b: statistics.median(tpots[name][b]) / steps[b] for b in steps},
                        "tpot_ratio_rounds": {b: [t / steps[b] for t in tpots[name][b]] for b in steps}})
        o = overs[name]
        if o:
            fig.update({
                "ingress_router_p50_ms": p50_ms(o["ingress"]),
                "ingress_router_p90_ms": sorted(o["ingress"])[int(0.9 * len(o["ingress"]))] * 1e3,
                "prefill_call_p50_ms": p50_ms(o["rpc"]),
                "prefill_call_in_p50_ms": p50_ms(o["rpc_in"]),
                "prefill_call_publish_p50_ms": p50_ms(o["publish"]),
                "prefill_call_out_p50_ms": p50_ms(o["rpc_out"]),
                "dispatch_p50_ms": p50_ms([a + b for a, b in zip(o["ingress"], o["rpc"])]),
                # Per request: the prefill call beyond its way in, publish and way back (the
                # ingress's routing and bookkeeping between dispatch and the call).
                "prefill_call_rest_p50_ms": p50_ms([r - i - p - b for r, i, p, b in
                                                    zip(o["rpc"], o["rpc_in"], o["publish"], o["rpc_out"])]),
                "client_e2e_minus_worker_p50_ms": p50_ms(o["outside"]),
            })
        if steps and trace is not None:
            fig["decode_worker_steps"] = {b: _worker_steps(trace, windows[name][b], b) for b in steps}
        out["paths"][name] = fig
    return out


def _worker_steps(trace: tuple[Any, int], windows: list[tuple[float, float]], batch: int) -> dict[str, Any]:
    """The decode worker's own steps (benchmarks/steptrace) at a batch of ``batch`` during
    the served runs: median step (wall, engine-thread CPU) and median period from one
    step's start to the next (the step plus what the engine thread did or waited for
    between steps)."""
    from benchmarks.admit_stall import _steps

    trace_dir, pid = trace
    steps = [s for s in _steps(trace_dir, pid) if not s["po"]]
    dts, cpus, periods = [], [], []
    for a, b in windows:
        ph = [s for s in steps if a <= s["t"] < b]
        for i, s in enumerate(ph):
            if len(s["n"]) == batch and all(n == 1 for n in s["n"]):
                dts.append(s["dt"])
                cpus.append(s["cpu"])
                if i + 1 < len(ph) and len(ph[i + 1]["n"]) == batch:
                    periods.append(ph[i + 1]["t"] - s["t"])
    if not dts:
        return {"steps": 0}
    return {"steps": len(dts), "step_ms": statistics.median(dts) * 1e3,
            "step_cpu_ms": statistics.median(cpus) * 1e3,
            "period_ms": statistics.median(periods) * 1e3 if periods else None}


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
    ap.add_argument("--parts", default="tpot,dispatch,kv,stall",
                    help="comma-separated subset of tpot, dispatch, kv (same-node KV GB/s: object store "
                         "vs arena vs memcpy), stall (admit stall: engine thread vs reserved blocks)")
    ap.add_argument("--kv-runs", type=int, default=7, help="interleaved rounds of the KV figure")
    ap.add_argument("--stall-rounds", type=int, default=2, help="A/B rounds of the admit-stall figure")
    ap.add_argument("--skip-kv", action="store_true", help="leave out the KV transfer figure (= --parts without kv)")
    args = ap.parse_args(argv)
    streams = [int(x) for x in args.streams.split(",")]
    parts = set(args.parts.split(",")) - ({"kv"} if args.skip_kv else set())
    if parts - {"tpot", "dispatch", "kv", "stall"}:
        ap.error(f"--parts: unknown {sorted(parts - {'tpot', 'dispatch', 'kv', 'stall'})}; "
                 "allowed: tpot, dispatch, kv, stall")

    import os
    import tempfile
    from pathlib import Path

    from cluster.manifest import load_manifest
    from cluster.serve import Server, deploy, init_ray
    from engine.config import ModelConfig

    manifest = load_manifest(args.manifest)
    # Closed-loop streams on a shared machine: measure them, do not refuse them (429s).
    manifest.server.ttft_admission = False
    model_dir = str(manifest.model_dir())
    cfg = ModelConfig.from_dir(model_dir)
    trace_dir = Path(tempfile.mkdtemp(prefix="splitserve-steps-"))
    if parts & {"stall", "tpot"}:  # step times of every worker (benchmarks/steptrace), before Ray starts
        here = Path(__file__).resolve().parent
        os.environ["SPLITSERVE_STEPTRACE_DIR"] = str(trace_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(here / "steptrace"), str(here.parent),
                                                    os.environ.get("PYTHONPATH", "")])
    started = init_ray(num_cpus=4)
    res: dict[str, Any] = {"manifest": args.manifest, "load_average_start": os.getloadavg()}
    dep = deploy(manifest) if parts & {"tpot", "dispatch", "stall"} else None
    server = Server(dep) if dep is not None else None
    try:
        url = server.start() if server is not None else ""
        decode_pid = None
        if dep is not None:
            state = ray.get(dep.controller.get_state.remote(), timeout=10)
            decode = [w for w in state["pools"]["decode"] if w["healthy"]][0]
            decode_pid = decode["stats"]["pid"]
        if parts & {"tpot", "dispatch"}:
            assert dep is not None
            res.update(_paths(dep, url, args, streams, model_dir, parts,
                              (trace_dir, decode_pid) if "tpot" in parts else None))
        if "kv" in parts:
            res["kv_transfer"] = kv_transfer_ratio(args.kv_mb << 20, args.kv_runs, cfg.num_hidden_layers,
                                                   cfg.num_key_value_heads, cfg.head_dim)
            res["load_average_after_kv"] = os.getloadavg()
            print(json.dumps({"kv_transfer": res["kv_transfer"]}), file=sys.stderr, flush=True)  # kept if interrupted
        if "stall" in parts:
            from benchmarks.admit_stall import run as admit_stall

            assert dep is not None
            state = ray.get(dep.controller.get_state.remote(), timeout=10)
            decode = [w for w in state["pools"]["decode"] if w["healthy"]][0]
            res["admit_stall"] = admit_stall(url, decode["handle"], decode["stats"]["pid"], trace_dir,
                                             model=manifest.model.name or "demo", rounds=args.stall_rounds)
    finally:
        if _CLIENT is not None:
            _CLIENT.shutdown()
        if server is not None:
            server.stop()
        if dep is not None:
            dep.stop()
        if started:
            ray.shutdown()
    res["load_average_end"] = os.getloadavg()
    res["targets"] = {"tpot_ratio": "<= 1.1", "dispatch_p50_ms": "<= 1 (ingress + router + prefill call)",
                      "kv_ratio": ">= 0.5", "admit_stall_worst_ratio": "<= 1.2"}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
