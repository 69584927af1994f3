"""Soak (issue 16): a deployment under a steady open-loop load at a fraction (default 70%)
of its measured capacity for a long time; every request must succeed and no process may
grow: RSS of the ingress (this process), the controller and every worker, sampled every
few seconds, its growth over the run after a warm-up fitted by least squares.

1. capacity: a closed loop of --clients clients for --capacity-s seconds (completed
   requests per second);
2. soak: Poisson arrivals at --load x capacity for --duration seconds, non-streamed
   greedy requests (prompts of 20-60 words, max_tokens 8-24), over raw sockets;
3. per process: RSS at the start and end of the post-warm-up window (fitted line), growth
   in percent, slope in MiB per 10 minutes.

    python -m benchmarks.soak --duration 1800 --json --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from array import array
from typing import Any

WARMUP_FRACTION = 0.2


async def _post(host: str, port: int, body: bytes, timeout_s: float) -> tuple[int, float]:
    t0 = time.monotonic()

    async def go() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        await writer.drain()
        data = await reader.read()
        writer.close()
        status = int(data.split(b" ", 2)[1])
        if status == 200 and b'"completion_tokens"' not in data:
            return -2  # a 200 without a complete body
        return status

    try:
        status = await asyncio.wait_for(go(), timeout_s)
    except (OSError, ValueError, IndexError, asyncio.TimeoutError):
        status = -1
    return status, time.monotonic() - t0


def _body(rng: random.Random, model: str) -> bytes:
    words = rng.randint(20, 60)
    prompt = " ".join(f"s{rng.randint(0, 999)}" for _ in range(words))
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": rng.randint(8, 24),
                       "temperature": 0}).encode()


async def capacity(host: str, port: int, model: str, clients: int, seconds: float) -> float:
    rng = random.Random(1)
    done = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < end:
            status, _ = await _post(host, port, _body(rng, model), 120)
            if status == 200:
                done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.monotonic() - t0)


async def open_loop(host: str, port: int, model: str, rate: float, seconds: float,
                    on_done: Any) -> list[tuple[float, int, float]]:
    rng = random.Random(2)
    # Flat arrays, not a tuple per request: this process is also the ingress whose RSS is
    # sampled, and ~120 bytes of Python objects per request (10 MiB over a 30-minute soak at
    # 48 req/s) showed as ingress growth in session 9's first run.
    ats, statuses, e2es = array("d"), array("h"), array("d")
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()

    async def one(at: float, body: bytes) -> None:
        status, e2e = await _post(host, port, body, 120)
        ats.append(at)
        statuses.append(status)
        e2es.append(e2e)
        on_done(status)

    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        delay = t0 + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.get_running_loop().create_task(one(t, _body(rng, model)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return list(zip(ats, statuses, e2es))


def fit_growth(samples: list[tuple[float, float]], duration_s: float) -> dict[str, float]:
    """Least-squares line of RSS over time after the warm-up: start and end of the fitted
    line, growth in percent, slope in MiB per 10 minutes."""
    after = [(t, r) for t, r in samples if t >= WARMUP_FRACTION * duration_s] or samples
    n = len(after)
    mt = sum(t for t, _ in after) / n
    mr = sum(r for _, r in after) / n
    var = sum((t - mt) ** 2 for t, _ in after)
    slope = sum((t - mt) * (r - mr) for t, r in after) / var if var > 0 else 0.0
    t_first, t_last = after[0][0], after[-1][0]
    start = mr + slope * (t_first - mt)
    end = mr + slope * (t_last - mt)
    return {"rss_start_mib": start / 2**20, "rss_end_mib": end / 2**20,
            "growth_pct": 100.0 * (end - start) / start if start > 0 else 0.0,
            "slope_mib_per_10min": slope * 600 / 2**20, "samples": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=1800.0, help="soak seconds")
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    ap.add_argument("--capacity-s", type=float, default=40.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the report here")
    a = ap.parse_args(argv)

    import cluster  # noqa: F401 - Ray environment
    import psutil
    import ray

    from cluster.manifest import parse_manifest
    from cluster.serve import Server, deploy, init_ray
    from models.builtin import builtin_model_dir

    started = init_ray(num_cpus=16)
    common = {"tp": 1, "num_cpus": 1, "num_kv_blocks": 256, "max_num_batched_tokens": 256}
    m = parse_manifest({
        "name": f"soak-{os.getpid()}", "model": {"path": str(builtin_model_dir(a.model)), "name": "soak"},
        "mode": "disaggregated", "pools": {"prefill": dict(common), "decode": dict(common)},
        "kv_cache": {"block_size": 8},
        # TTFT admission off: the soak wants to see every request served (a 429 is an error here).
        "server": {"request_timeout_s": 120, "token_timeout_s": 30, "ttft_admission": False}})
    dep = deploy(m, timeout_s=300)
    server = Server(dep)
    report: dict[str, Any] = {"duration_s": a.duration, "load": a.load, "model": a.model}
    try:
        url = server.start()
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        cap = asyncio.run(capacity(host, int(port), "soak", a.clients, a.capacity_s))
        rate = a.load * cap
        report.update(capacity_rps=cap, rate_rps=rate)
        print(f"capacity {cap:.2f} req/s; soaking at {rate:.2f} req/s for {a.duration:.0f} s", file=sys.stderr,
              flush=True)

        def pids() -> dict[str, int]:
            state = ray.get(dep.controller.get_state.remote(), timeout=30)
            out = {"ingress": os.getpid(),
                   "controller": ray.get(dep.controller.__ray_call__.remote(lambda self: os.getpid()), timeout=30)}
            for ws in state["pools"].values():
                for w in ws:
                    if w.get("stats", {}).get("pid"):
                        out[w["worker_id"]] = w["stats"]["pid"]
            return out

        procs = pids()
        rss: dict[str, list[tuple[float, float]]] = {k: [] for k in procs}
        stop = threading.Event()
        t_start = time.monotonic()
        counts = {"ok": 0, "errors": 0}

        def sampler() -> None:
            while not stop.is_set():
                now = time.monotonic() - t_start
                for name, pid in procs.items():
                    try:
                        rss[name].append((now, float(psutil.Process(pid).memory_info().rss)))
                    except psutil.NoSuchProcess:
                        rss[name].append((now, float("nan")))
                stop.wait(a.sample_s)

        def on_done(status: int) -> None:
            counts["ok" if status == 200 else "errors"] += 1

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        results = asyncio.run(open_loop(host, int(port), "soak", rate, a.duration, on_done))
        stop.set()
        th.join(timeout=30)
        errors = [(t, s) for t, s, _ in results if s != 200]
        e2e = sorted(e for _, s, e in results if s == 200)
        report.update(requests=len(results), errors=len(errors), error_statuses=sorted({s for _, s in errors}),
                      e2e_p50_s=e2e[len(e2e) // 2] if e2e else None,
                      e2e_p99_s=e2e[int(0.99 * len(e2e))] if e2e else None,
                      workers_replaced=ray.get(dep.controller.get_state.remote(), timeout=30)["replacements"],
                      load_avg=os.getloadavg())
        lost = [k for k, s in rss.items() if any(r != r for _, r in s)]
        report["processes_lost"] = lost
        report["rss"] = {k: fit_growth([(t, r) for t, r in s if r == r], a.duration) for k, s in rss.items() if s}
    finally:
        server.stop()
        dep.stop()
        if started:
            ray.shutdown()
    text = json.dumps(report, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text if a.json else
          f"{report.get('requests')} requests, {report.get('errors')} errors; RSS growth %: "
          + ", ".join(f"{k} {v['growth_pct']:+.2f}" for k, v in report.get("rss", {}).items()))
    return 0 if report.get("errors") == 0 and not report.get("processes_lost") else 1


if __name__ == "__main__":
    sys.exit(main())
