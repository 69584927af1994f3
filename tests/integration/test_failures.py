"""A worker that dies mid-request ends that request with an error within seconds (or, where
the request can be re-sent, completes it unchanged); the controller replaces it and later
requests succeed."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
import ray

from .conftest import manifest_for, serving, wait_healthy


def workers(dep, pool: str) -> list[dict]:
    return ray.get(dep.controller.get_state.remote(), timeout=10)["pools"][pool]


def wait_replaced(dep, pool: str, old_id: str, timeout_s: float = 90.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ws = [w for w in workers(dep, pool) if w["healthy"] and w["worker_id"] != old_id]
        if ws:
            return ws[0]["worker_id"]
        time.sleep(0.2)
    raise TimeoutError(f"{pool} worker {old_id} not replaced within {timeout_s}s")


def test_decode_death_mid_stream(ray_session, llama_dir):
    with serving(manifest_for(llama_dir)) as (url, dep):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)
        victim = workers(dep, "decode")[0]
        stream = client.completions.create(model="tiny", prompt="import os", max_tokens=2000,
                                           stream=True, extra_body={"ignore_eos": True})
        got = 0
        t_kill = None
        with pytest.raises(openai.APIError) as err:
            for _chunk in stream:
                got += 1
                if got == 5:
                    ray.kill(victim["handle"], no_restart=True)
                    t_kill = time.monotonic()
        assert t_kill is not None and time.monotonic() - t_kill < 10
        assert "failed" in str(err.value)
        new_id = wait_replaced(dep, "decode", victim["worker_id"])
        assert new_id != victim["worker_id"]
        wait_healthy(url)
        r = client.completions.create(model="tiny", prompt="import os", max_tokens=8,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8


def test_colocated_death_before_first_token_is_503(ray_session, llama_dir):
    with serving(manifest_for(llama_dir, mode="colocated")) as (url, dep):
        victim = workers(dep, "colocated")[0]
        ray.kill(victim["handle"], no_restart=True)
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 503 and time.monotonic() - t0 < 10, r.text
        assert r.json()["error"]["type"] == "service_unavailable"
        wait_replaced(dep, "colocated", victim["worker_id"])
        wait_healthy(url)
        deadline = time.monotonic() + 30
        while True:  # the ingress picks up the new worker within its refresh period
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4},
                           timeout=30)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text


def test_prefill_worker_killed_under_load(ray_session, llama_dir):
    """SIGKILL of the prefill worker's process while a closed loop of greedy requests runs:
    every request ends (no hang) either with the same output as without the fault or with
    a 503 OpenAI error object; nothing else, nothing wrong. The pool gets a new prefill
    worker and requests succeed again, unchanged."""
    prompts = [" ".join(f"def f{i}_{j}(x): return x + {j}" for j in range(40)) for i in range(4)]
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with serving(manifest_for(llama_dir)) as (url, dep):
        with httpx.Client(timeout=90) as http:
            def complete(prompt: str) -> httpx.Response:
                return http.post(f"{url}/v1/completions", json={**body, "prompt": prompt})

            expected = {p: complete(p).json()["choices"][0]["text"] for p in prompts}
            victim = workers(dep, "prefill")[0]
            results: list[tuple[str, httpx.Response]] = []
            raised: list[BaseException] = []  # a request that hung or broke the connection
            stop = threading.Event()

            def loop(offset: int) -> None:
                i = offset
                while not stop.is_set():
                    p = prompts[i % len(prompts)]
                    try:
                        r = complete(p)
                    except Exception as e:  # noqa: BLE001 - reported by the test
                        raised.append(e)
                        return
                    results.append((p, r))
                    if r.status_code != 200:
                        time.sleep(0.05)  # no busy loop of fast 503s while the pool recovers
                    i += 1

            threads = [threading.Thread(target=loop, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            try:
                deadline = time.monotonic() + 60
                while len(results) < 4:  # under way
                    assert not raised and time.monotonic() < deadline, raised
                    time.sleep(0.01)
                os.kill(victim["stats"]["pid"], signal.SIGKILL)
                killed_at = len(results)
                new_id = wait_replaced(dep, "prefill", victim["worker_id"])
                wait_healthy(url)
                # Until a request after the replacement succeeds (the ingress refreshes its view).
                deadline = time.monotonic() + 60
                while not any(r.status_code == 200 for _, r in results[killed_at + 2:]):
                    since = [r.status_code for _, r in results[killed_at:]]
                    assert not raised and time.monotonic() < deadline, (raised, since)
                    time.sleep(0.1)
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=120)
            assert not raised, raised
            assert new_id != victim["worker_id"]
            statuses = [r.status_code for _, r in results]
            assert set(statuses) <= {200, 503}, statuses
            for p, r in results:
                if r.status_code == 200:
                    assert r.json()["choices"][0]["text"] == expected[p]
                else:
                    err = r.json()["error"]
                    assert err["type"] == "service_unavailable" and err["message"], err
            # Served by the new worker, unchanged.
            for p in prompts:
                assert complete(p).json()["choices"][0]["text"] == expected[p]
