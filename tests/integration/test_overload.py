"""Overload: a burst far beyond capacity gets 200s and early 429s with Retry-After (the
requests predicted to miss the TTFT target from the queue ahead and the measured prefill
rate), never a 5xx, and nothing is held afterwards. Refusal is cheap: a request whose
queue plus the shortest recent prompt predicts a miss is refused before its body is parsed (so before tokenizing
and any Ray call); the ingress counts the bodies it parsed, and the count
accounts for every other request exactly. Timings: benchmarks/burst.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import manifest_for, serving
from .test_failures import wait_kv_released


def test_burst_of_300_gets_only_200_and_429(ray_session, llama_dir):
    m = manifest_for(llama_dir, slo={"ttft_ms": 300, "tpot_ms": 100, "attainment": 0.9},
                     server={"request_timeout_s": 120, "token_timeout_s": 30, "health_check_period_s": 0.5,
                             # Far above the burst: the 429s here come from the TTFT prediction.
                             "max_waiting_requests": 1000})
    prompts = [" ".join(f"t{i}_{j}" for j in range(60)) for i in range(300)]
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    with serving(m) as (url, dep):
        with httpx.Client(timeout=60) as http:
            for p in prompts[:5]:  # the ingress measures the prefill rate
                assert http.post(f"{url}/v1/completions", json={**body, "prompt": p}).status_code == 200
        # A burst from raw sockets in another process (benchmarks/burst.py's client):
        # all 300 arrive within milliseconds, every one passes the early check before any is
        # admitted unless the requests let through count as queued ahead of later arrivals
        # until their exact check (cluster/admission.py Unadmitted). Without that, 86-141 of
        # 300 were parsed, tokenized and only then refused.
        out = subprocess.run([sys.executable, "-m", "benchmarks.burst", "--client", url, "--n", "300"],
                             capture_output=True, text=True, check=True, timeout=300,
                             cwd=Path(__file__).resolve().parents[2])
        codes = [r["status"] for r in json.loads(out.stdout)]
        wait_kv_released(dep)
        mid = httpx.get(f"{url}/metrics", timeout=10).text
        raw_parsed = metric(mid, "splitserve_ingress_bodies_parsed_total") - 5

        async def burst() -> list[tuple[httpx.Response, float]]:
            limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
            async with httpx.AsyncClient(timeout=300, limits=limits) as client:
                async def one(p: str) -> tuple[httpx.Response, float]:
                    t0 = time.monotonic()
                    r = await client.post(f"{url}/v1/completions", json={**body, "prompt": p})
                    return r, time.monotonic() - t0
                return list(await asyncio.gather(*(one(p) for p in prompts)))

        results = asyncio.run(burst())
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        wait_kv_released(dep)
        # Every admission ticket came back (admitted, refused or ended): none held for good.
        assert dep.ingress.unadmitted.count == 0
    assert set(codes) <= {200, 429} and 200 in codes, sorted(set(codes))
    # Some are still parsed and refused by the exact check (a prompt longer than the shortest
    # recent one that the early check assumed): 10-43 seen; without the ticket 209.
    assert raw_parsed <= 75, (raw_parsed, codes.count(200))
    statuses = [r.status_code for r, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    ok = [(r, s) for r, s in results if r.status_code == 200]
    rejected = [(r, s) for r, s in results if r.status_code == 429]
    assert ok and rejected, (len(ok), len(rejected))
    for r, _ in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and "predicted time to first token" in err["message"], err
    for r, _ in ok:
        assert r.json()["usage"]["completion_tokens"] == 4
    early = [r for r, _ in rejected if "refused before parsing the request" in r.json()["error"]["message"]]
    # Once the admitted requests fill the queue, the rest are refused before parsing.
    assert early, [r.json()["error"]["message"] for r, _ in rejected[:3]]
    def delta(name: str) -> float:  # this burst's part of a counter
        return metric(metrics, name) - metric(mid, name)

    assert delta('splitserve_admission_rejected_total{reason="ttft_queue"}') == len(early)
    late = delta('splitserve_admission_rejected_total{reason="ttft"}')
    assert late == len(rejected) - len(early)
    # Bodies parsed: the admitted ones and the late refusals; none of the early ones.
    assert delta("splitserve_ingress_bodies_parsed_total") == len(ok) + late
    print(f"burst of 300: {len(ok)} x 200 (slowest {max(s for _, s in ok):.2f}s end to end), "
          f"{len(rejected)} x 429 ({len(early)} before parsing the body; slowest answer "
          f"{max(s for _, s in rejected):.2f}s)")


def metric(text: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
