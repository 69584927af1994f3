"""Nothing leaks: after clients disconnect mid-stream and mid-request (the KV moving over
gRPC, so senders hold parts), every worker's KV blocks for requests, sender-held parts and
prefetched transfers return to 0 within seconds; prefix-cache blocks are a separate gauge."""

from __future__ import annotations

import threading
import time

import httpx

from .conftest import manifest_for, serving
from .test_failures import wait_kv_released


def gauge(metrics: str, name: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_disconnects_release_everything(ray_session, llama_dir):
    m = manifest_for(llama_dir, kv_transfer={"transport": "grpc", "codec": "none"})
    prompts = [" ".join(f"v{i}_{j} = {j}" for j in range(30 + 4 * i)) for i in range(6)]
    body = {"model": "tiny", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with serving(m) as (url, dep):
        def stream_then_leave(prompt: str) -> None:
            with httpx.Client(timeout=120) as http:
                with http.stream("POST", f"{url}/v1/completions",
                                 json={**body, "prompt": prompt, "stream": True}) as r:
                    assert r.status_code == 200
                    for i, _ in enumerate(r.iter_lines()):
                        if i >= 6:
                            return  # closes the connection mid-stream

        def request_then_leave(prompt: str) -> None:
            try:
                httpx.post(f"{url}/v1/completions", json={**body, "prompt": prompt}, timeout=3)
            except httpx.TimeoutException:
                return  # the client gave up: the connection is closed
            raise AssertionError("1500 tokens came back within 3 s: the client did not leave mid-request")

        threads = [threading.Thread(target=stream_then_leave, args=(p,)) for p in prompts[:3]]
        threads += [threading.Thread(target=request_then_leave, args=(p,)) for p in prompts[3:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads)
        left = time.monotonic()
        wait_kv_released(dep, timeout_s=20)
        print(f"released {time.monotonic() - left:.1f}s after the clients left")
        deadline = time.monotonic() + 10
        while True:  # the ingress's gauges follow within its refresh period
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            used = gauge(metrics, "splitserve_worker_kv_blocks_used")
            if used and not any(used.values()):
                break
            assert time.monotonic() < deadline, used
            time.sleep(0.5)
        held = gauge(metrics, "splitserve_worker_kv_transfers_held")
        assert held and not any(held.values()), held
        cached = gauge(metrics, "splitserve_worker_kv_blocks_cached")
        # The prompts' full blocks stay in the prefix cache, apart from "used".
        assert cached and any(cached.values()), cached
        # The workers serve on, unchanged.
        r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": prompts[0], "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
