"""The served side of the simulator check (issue 5; ``benchmarks.sim_validate`` compares):
deploy a layout of the demo model, probe it (isolated requests, decode bursts, bursts beside
a busy prefill worker, arrivals beside a long decode, speed probes), run the rates, and
record every request with the workers' busy time and the machine's CPU per window."""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


LAYOUTS: dict[str, dict[str, Any]] = {
    "colocated": {"mode": "colocated", "pools": {"colocated": {"num_cpus": 1, "max_num_batched_tokens": 512,
                                                               "num_kv_blocks": 512}}},
    "1p1d": {"mode": "disaggregated", "pools": {"prefill": {"num_cpus": 1, "max_num_batched_tokens": 512,
                                                            "num_kv_blocks": 256},
                                                "decode": {"num_cpus": 1, "num_kv_blocks": 512}}},
}
BUDGET = 512
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # tiny-llama fp32: K+V, 4 layers, 2 heads of 16
# One node: the KV moves through the object store (measured ~0.8 GB/s incl. scatter).
LINK_BPS = 0.8e9
PROBE_PROMPTS = (64, 512, 1024, 1280)
PROBE_OUTPUTS = (4, 40)
BURSTS = (2, 4, 8)
# The arrival probe (disaggregated layouts): a long decode, alone and while short requests
# arrive beside it, each handing its KV to the same decode worker.
ARRIVAL_LONG = (64, 120)
ARRIVAL_SHORT = (256, 2)
ARRIVAL_COUNT = 6
ARRIVAL_GAP_S = 0.04
# The speed probe around each window: one prompt length, a short and a long output.
SPEED_SHAPES = ((1024, 4), (1024, 24))
SPEED_REPS = 3


# -- the served system ----------------------------------------------------------------------

def _workers(dep: Any) -> dict[str, list[Any]]:
    import ray

    state = ray.get(dep.controller.get_state.remote(), timeout=30)
    return {pool: [w["handle"] for w in ws] for pool, ws in state["pools"].items()}


def _busy(workers: dict[str, list[Any]]) -> dict[str, float]:
    """Engine busy seconds so far of each pool (summed over its workers)."""
    import ray

    out = {}
    for pool, hs in workers.items():
        out[pool] = sum(h["busy_s"] for h in ray.get([w.health.remote() for w in hs], timeout=30))
    return out


def _cpu_now() -> dict[str, float]:
    """CPU seconds so far: the whole machine busy (all cores, /proc/stat, Linux only) and
    this process (the load client and the HTTP ingress)."""
    out = {"this_process": sum(os.times()[:2])}
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        out["machine_busy"] = (sum(fields) - fields[3] - fields[4]) / tick  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        pass
    return out


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in b}


def _spec(prompt: int, output: int, seed: int) -> Any:
    from benchmarks.workload import RequestSpec

    rng = np.random.default_rng([seed, prompt, output])
    return RequestSpec(0.0, rng.integers(3, 1024, size=prompt).tolist(), prompt, output)


async def _speed_probe(client: Any, info: Any, seed: int, reps: int = SPEED_REPS) -> list[dict[str, Any]]:
    """SPEED_SHAPES one at a time, reps rounds: the machine's speed right now."""
    from benchmarks.client import send

    out = []
    for k in range(reps):
        for p, o in SPEED_SHAPES:
            r = await send(client, info, _spec(p, o, seed * 100 + k), "completions", 60)
            out.append({"prompt": p, "output": o, "ok": r.ok, "ttft_s": r.ttft_s, "e2e_s": r.e2e_s})
            await asyncio.sleep(0.05)
    return out


async def _speed_around(info: Any, seed: int) -> list[dict[str, Any]]:
    from benchmarks.client import make_client

    async with make_client(60) as client:
        return await _speed_probe(client, info, seed)


async def _probe(url: str, workers: dict[str, list[Any]], reps: int, seed0: int = 0) -> dict[str, Any]:
    """Isolated requests and decode bursts against the served layout."""
    from benchmarks.client import make_client, preflight, send

    iso: list[dict[str, Any]] = []
    bursts: list[dict[str, Any]] = []
    async with make_client(60) as client:
        info = await preflight(client, url, None, "completions")
        # Warm-up: every probe shape once, unrecorded (the first requests of a fresh
        # worker at a new size run up to 1.5x slower: allocator, first touch of KV pages).
        for p in PROBE_PROMPTS:
            for o in PROBE_OUTPUTS:
                await send(client, info, _spec(p, o, 10_000 + p + o), "completions", 60)
        await asyncio.gather(*[send(client, info, _spec(64, 40, 20_000 + k), "completions", 60)
                               for k in range(max(BURSTS))])
        seed = seed0
        speed = await _speed_probe(client, info, 50_000 + seed0)
        for _ in range(reps):
            for p in PROBE_PROMPTS:
                for o in PROBE_OUTPUTS:
                    seed += 1
                    b0 = await asyncio.to_thread(_busy, workers)
                    r = await send(client, info, _spec(p, o, seed), "completions", 60)
                    b1 = await asyncio.to_thread(_busy, workers)
                    if r.ok:
                        iso.append({"prompt": p, "output": o, "ttft_s": r.ttft_s, "e2e_s": r.e2e_s,
                                    "busy_s": _delta(b0, b1)})
                    await asyncio.sleep(0.05)
        for _ in range(reps):
            for b in BURSTS:
                seed += 1
                rs = await asyncio.gather(*[send(client, info, _spec(64, 40, seed * 100 + k), "completions", 60)
                                            for k in range(b)])
                ok = [r for r in rs if r.ok]
                if ok:
                    bursts.append({"batch": b, "prompt": 64, "output": 40,
                                   "decode_s": statistics.mean(r.e2e_s - r.ttft_s for r in ok)})
                await asyncio.sleep(0.05)
        # Interference: the same 4-sequence burst while another request keeps the
        # prefill pool busy (back-to-back long prompts), against the burst alone; and the
        # long prompts sent while the burst decodes, against the same prompt alone.
        loaded: list[dict[str, Any]] = []
        if "prefill" in workers:
            for _ in range(reps):
                seed += 1
                stop = asyncio.Event()
                burst_on = asyncio.Event()
                beside: list[float] = []

                async def hammer(seed: int = seed) -> None:
                    k = 0
                    while not stop.is_set():
                        k += 1
                        during = burst_on.is_set()
                        r = await send(client, info, _spec(1280, 1, seed * 1000 + k), "completions", 60)
                        if during and not stop.is_set() and r.ok:
                            beside.append(r.ttft_s)

                h = asyncio.create_task(hammer())
                await asyncio.sleep(0.05)
                burst_on.set()
                rs = await asyncio.gather(*[send(client, info, _spec(64, 40, seed * 100 + k), "completions", 60)
                                            for k in range(4)])
                stop.set()
                await h
                ok = [r for r in rs if r.ok]
                if ok:
                    loaded.append({"batch": 4, "decode_s": statistics.mean(r.e2e_s - r.ttft_s for r in ok),
                                   "prefill_1280_ttft_s": beside})
                await asyncio.sleep(0.05)
        arrivals: list[dict[str, Any]] = []
        if "prefill" in workers:
            for _ in range(reps):
                seed += 1
                alone = await send(client, info, _spec(*ARRIVAL_LONG, seed), "completions", 60)
                await asyncio.sleep(0.05)
                t0 = time.monotonic()
                long_task = asyncio.create_task(send(client, info, _spec(*ARRIVAL_LONG, seed + 500_000), "completions",
                                                           60))
                await asyncio.sleep(0.03)  # past the long request's prefill
                offsets, shorts = [], []
                for j in range(ARRIVAL_COUNT):
                    offsets.append(time.monotonic() - t0)
                    shorts.append(asyncio.create_task(send(client, info, _spec(*ARRIVAL_SHORT, seed * 100 + j),
                                                           "completions", 60)))
                    await asyncio.sleep(ARRIVAL_GAP_S)
                beside = await long_task
                await asyncio.gather(*shorts)
                if alone.ok and beside.ok and alone.ttft_s is not None and beside.ttft_s is not None:
                    arrivals.append({"alone_decode_s": alone.e2e_s - alone.ttft_s,
                                     "beside_decode_s": beside.e2e_s - beside.ttft_s, "offsets_s": offsets})
                await asyncio.sleep(0.05)
    return {"isolated": iso, "bursts": bursts, "loaded_bursts": loaded, "speed": speed, "arrivals": arrivals}


def measure(layout: str, rates: list[float], duration: float, out: Path, reps: int,
            rate_reps: int = 1) -> dict[str, Any]:
    """Serve the layout, probe it, run the rates (all of them, then all again: rate_reps
    rounds); returns probes, records (each tagged with its round) and busy times."""
    import yaml

    from benchmarks.metrics import SLO
    from benchmarks.runner import BenchConfig, Collector, run_rate
    from benchmarks.targets import Target, manifest_cpus, ray_session
    from benchmarks.workload import WORKLOADS
    from cluster.manifest import load_manifest
    from cluster.serve import Server, deploy

    manifest_data = {"name": f"simval-{layout}", "model": {"builtin": "tiny-llama", "name": "demo"},
                     "kv_cache": {"block_size": 16}, **LAYOUTS[layout]}
    mpath = out / f"{layout}.yaml"
    mpath.write_text(yaml.safe_dump(manifest_data))
    manifest = load_manifest(mpath)
    cfg = BenchConfig(rates=rates, duration_s=duration, slo=SLO(1000, 50, 0.9), workload=WORKLOADS["summarize"],
                      trace=None, progress=False)
    cols = [Collector(out / layout / f"round{k}", manifest.name, cfg) for k in range(rate_reps)]
    runs: list[dict[str, Any]] = []
    with ray_session(None, max(2, math.ceil(manifest_cpus(manifest)))):
        dep = deploy(manifest, timeout_s=600)
        server = Server(dep)
        try:
            url = server.start()
            workers = _workers(dep)
            # Probes before and after the load, pooled: background load on this shared
            # machine comes and goes, and the simulator should not hang on one moment.
            probes = asyncio.run(_probe(url, workers, reps))
            target = Target(url, manifest.name, 1, 1.0, "cpu")
            from benchmarks.client import ServerInfo

            info = ServerInfo(url, "demo", True)
            for k, col in enumerate(cols):
                for j, rate in enumerate(rates):
                    seed = 60_000 + 1000 * k + 10 * j
                    before = asyncio.run(_speed_around(info, seed))
                    b0 = _busy(workers)
                    load0 = os.getloadavg()
                    c0, t0 = _cpu_now(), time.monotonic()
                    asyncio.run(run_rate(target, info, cfg, rate, col, None))
                    busy = _delta(b0, _busy(workers))
                    cpu = {**_delta(c0, _cpu_now()), "wall": time.monotonic() - t0}
                    load1 = os.getloadavg()
                    after = asyncio.run(_speed_around(info, seed + 1))
                    runs.append({"rate": rate, "round": k, "busy_s": busy, "cpu_s": cpu, "loadavg_before": load0,
                                 "loadavg_after": load1, "speed_probes": before + after})
                    col.write()
            after = asyncio.run(_probe(url, workers, reps, seed0=1000))
            probes = {k: probes[k] + after[k] for k in probes}  # "speed": the window factors' reference
        finally:
            server.stop()
            dep.stop()
    records = [{**json.loads(line), "round": k} for k in range(rate_reps)
               for line in (out / layout / f"round{k}" / "requests.jsonl").read_text().splitlines()]
    return {"probes": probes, "runs": runs, "records": records}
