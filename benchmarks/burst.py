"""Burst benchmark (issue 16): N concurrent streamed requests at once against one deployment,
in three admission modes, interleaved in one run (A B C A B C ...):

- ``early``: TTFT admission with the queue-alone refusal before the body is read (now);
- ``late``: TTFT admission after reading, parsing and tokenizing only (before this change:
  ``Ingress.refuse_early`` replaced by the in-flight check alone, in this process);
- ``off``: no TTFT admission (every request queued).

Per burst: how many got 200 / 429 / other, how long the 429s took to come back, and the
admitted requests' time to first token (first SSE chunk) against the SLO (attainment =
share of admitted requests with TTFT <= slo). The server runs in this process (uvicorn in
a thread, as ``splitserve serve``); the clients run in a separate process so that they do
not take the ingress's interpreter.

    python -m benchmarks.burst --json --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _one(host: str, port: int, body: bytes) -> dict[str, Any]:
    """One POST over a raw socket (HTTP/1.1, Connection: close): status, time to the first
    SSE data line, end to end. httpx costs ~12 ms of client CPU per request (measured: 3.5 s
    for 300), which on this shared machine made the clients, not the ingress, the bottleneck."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        await writer.drain()
        buf = b""
        ttft = None
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
            if ttft is None and b"data: " in buf:
                ttft = time.monotonic() - t0
        writer.close()
        status = int(buf.split(b" ", 2)[1])
        head = buf.split(b"\r\n\r\n", 1)[0].lower()
        return {"status": status, "ttft_s": ttft if status == 200 else None, "e2e_s": time.monotonic() - t0,
                "retry_after": b"retry-after:" in head, "done": b"data: [DONE]" in buf}
    except (OSError, ValueError, IndexError) as e:
        return {"status": -1, "error": repr(e), "e2e_s": time.monotonic() - t0}


async def _client(url: str, n: int, words: int, max_tokens: int) -> list[dict[str, Any]]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    base = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    bodies = [json.dumps({**base, "prompt": " ".join(f"b{time.monotonic_ns() % 997}_{i}_{j}"
                                                      for j in range(words))}).encode() for i in range(n)]
    return list(await asyncio.gather(*(_one(host, int(port), b) for b in bodies)))


def _summary(rows: list[dict[str, Any]], slo_s: float) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200 and r.get("done")]
    refused = [r for r in rows if r["status"] == 429]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    rej = [r["e2e_s"] for r in refused]
    return {"n200": len(ok), "n429": len(refused), "other": len(rows) - len(ok) - len(refused),
            "refused_p50_s": _pct(rej, 0.5), "refused_p99_s": _pct(rej, 0.99), "refused_max_s": max(rej, default=None),
            "ttft_p50_s": _pct(ttfts, 0.5), "ttft_p90_s": _pct(ttfts, 0.9), "ttft_max_s": max(ttfts, default=None),
            "attainment": (sum(t <= slo_s for t in ttfts) / len(ttfts)) if ttfts else None,
            "met_slo": sum(t <= slo_s for t in ttfts)}


def _late(self: Any, holding: Any = None) -> Any:
    """``late`` mode's Ingress.refuse_early: the in-flight limit only, TTFT after tokenizing."""
    self._check_inflight()
    return holding


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the clients against URL
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--words", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--slo-ttft-ms", type=float, default=300.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="early,late,off")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.client:
        print(json.dumps(asyncio.run(_client(a.client, a.n, a.words, a.max_tokens))))
        return 0

    import cluster  # noqa: F401 - Ray environment
    import httpx

    from cluster.ingress import Ingress
    from cluster.manifest import parse_manifest
    from cluster.serve import Server, deploy, init_ray
    from models.builtin import builtin_model_dir

    started = init_ray(num_cpus=16)
    common = {"tp": 1, "num_cpus": 1, "num_kv_blocks": 256, "max_num_batched_tokens": 256}
    m = parse_manifest({
        "name": "burst", "model": {"path": str(builtin_model_dir(a.model)), "name": "tiny"},
        "mode": "disaggregated", "pools": {"prefill": dict(common), "decode": dict(common)},
        "kv_cache": {"block_size": 8},
        "slo": {"ttft_ms": a.slo_ttft_ms, "tpot_ms": 100, "attainment": 0.9},
        "server": {"request_timeout_s": 120, "token_timeout_s": 30, "health_check_period_s": 0.5,
                   "max_waiting_requests": 1000}})
    dep = deploy(m, timeout_s=300)
    server = Server(dep)
    early = Ingress.refuse_early
    results: list[dict[str, Any]] = []
    try:
        url = server.start()
        with httpx.Client(timeout=60) as http:
            for i in range(5):  # the ingress measures the prefill rate
                http.post(f"{url}/v1/completions", json={"model": "tiny", "max_tokens": 4, "temperature": 0,
                                                         "prompt": " ".join(f"w{i}_{j}" for j in range(a.words))})
        for rnd in range(a.rounds):
            for mode in a.modes.split(","):
                dep.ingress.m.server.ttft_admission = mode != "off"
                Ingress.refuse_early = early if mode == "early" else _late  # type: ignore[method-assign]
                time.sleep(2)  # idle between bursts
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, "-m", "benchmarks.burst", "--client", url, "--n", str(a.n),
                                      "--words", str(a.words), "--max-tokens", str(a.max_tokens)],
                                     capture_output=True, text=True, check=True, timeout=900)
                rows = json.loads(out.stdout)
                s = {"round": rnd, "mode": mode, "load_avg": load, **_summary(rows, a.slo_ttft_ms / 1000)}
                results.append(s)
                if not a.json:
                    print(s, flush=True)
    finally:
        Ingress.refuse_early = early  # type: ignore[method-assign]
        server.stop()
        dep.stop()
        if started:
            import ray

            ray.shutdown()
    by_mode: dict[str, Any] = {}
    for mode in a.modes.split(","):
        rs = [r for r in results if r["mode"] == mode]
        by_mode[mode] = {k: statistics.median([r[k] for r in rs if r[k] is not None] or [float("nan")])
                         for k in ("n200", "n429", "other", "refused_p50_s", "refused_max_s", "ttft_p50_s",
                                   "ttft_p90_s", "attainment")}
    report = {"n": a.n, "slo_ttft_ms": a.slo_ttft_ms, "runs": results, "median_by_mode": by_mode}
    print(json.dumps(report, indent=1) if a.json else json.dumps(by_mode, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
