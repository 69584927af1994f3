"""Nothing leaks: after clients disconnect mid-stream and mid-request (the KV moving over
gRPC, so senders hold parts), every worker's KV blocks for requests, sender-held parts and
prefetched transfers return to 0 within seconds; prefix-cache blocks are a separate gauge.
With the KV moving through Ray's object store, after disconnects, aborts and a decode
worker killed mid-stream, the object store holds no more objects than before the requests
(Ray's memory summary, from the GCS)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import ray

from .conftest import manifest_for, serving
from .test_failures import wait_kv_released, wait_replaced, workers


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


def plasma_objects() -> int:
    """Objects in the object store over all nodes (Ray's memory summary; no dashboard needed)."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage \S+ \S+, (\d+) objects", text)
    assert m, text
    return int(m.group(1))


def test_object_store_holds_nothing_after_faults_and_aborts(ray_session, llama_dir):
    # One node, the shared-memory arena off: the KV moves through the object store.
    m = manifest_for(llama_dir, kv_transfer={"transport": "object_store"})
    body = {"model": "tiny", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    prompts = [" ".join(f"o{i}_{j} = {j}" for j in range(40 + 6 * i)) for i in range(8)]
    with serving(m) as (url, dep):
        httpx.post(f"{url}/v1/completions", json={**body, "prompt": prompts[0], "max_tokens": 2}, timeout=60)
        wait_kv_released(dep)
        before = plasma_objects()
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], plasma_objects())
                time.sleep(0.05)

        def stream_then_leave(prompt: str, after: int) -> None:
            with httpx.Client(timeout=120) as http:
                with http.stream("POST", f"{url}/v1/completions", json={**body, "prompt": prompt, "stream": True}) as r:
                    assert r.status_code == 200
                    for i, _ in enumerate(r.iter_lines()):
                        if i >= after:
                            return

        def complete(prompt: str) -> None:
            r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": prompt}, timeout=120)
            assert r.status_code == 200, r.text

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=stream_then_leave, args=(p, 1 + 2 * i)) for i, p in enumerate(prompts[:4])]
        threads += [threading.Thread(target=complete, args=(p,)) for p in prompts[4:]]
        for t in threads:
            t.start()
        # A decode worker dies while requests run on it: they resume elsewhere.
        victim = workers(dep, "decode")[0]
        time.sleep(0.5)
        os.kill(victim["stats"]["pid"], signal.SIGKILL)
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads)
        wait_replaced(dep, "decode", victim["worker_id"])
        wait_kv_released(dep)
        deadline = time.monotonic() + 20
        while (now := plasma_objects()) > before:
            assert time.monotonic() < deadline, f"{now} objects in the object store, {before} before the requests"
            time.sleep(0.5)
        stop.set()
        sampler.join(timeout=10)
        # The KV did go through the object store (else this test would measure nothing).
        assert peak[0] > before, (peak[0], before)
        print(f"object store: {before} objects before, peak {peak[0]}, {now} after")
