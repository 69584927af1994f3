"""A worker that dies mid-request loses no request: a prefill worker's requests are re-sent
to another prefill worker, a decode worker's resume on another decode worker from the
prompt and the tokens so far, with the same greedy output as without the fault; the
controller replaces the dead worker and later requests succeed."""

from __future__ import annotations

import os
import signal
import threading
import time

from pathlib import Path

import httpx
import openai
import pytest
import ray
import yaml

from cluster.manifest import parse_manifest

from .conftest import manifest_for, serving, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


def demo_ha(name: str):
    """deploy/manifests/demo-ha.yaml (tiny model, 2 prefill + 2 decode workers) under its
    own deployment name."""
    data = yaml.safe_load((ROOT / "deploy/manifests/demo-ha.yaml").read_text())
    return parse_manifest({**data, "name": name}, base_dir=str(ROOT / "deploy/manifests"))


def workers(dep, pool: str) -> list[dict]:
    return ray.get(dep.controller.get_state.remote(), timeout=10)["pools"][pool]


def wait_kv_released(dep, timeout_s: float = 20.0) -> None:
    """Within timeout_s, every live worker holds no KV block for a request and no KV
    transfer (sender parts, prefetched KV): nothing leaked."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = ray.get(dep.controller.get_state.remote(), timeout=10)
        held = {w["worker_id"]: (w["stats"]["kv_blocks_total"] - w["stats"]["kv_blocks_free"],
                                 w["stats"].get("kv_transfers_held", 0))
                for ws in state["pools"].values() for w in ws if w["healthy"] and w.get("stats")}
        if held and all(v == (0, 0) for v in held.values()):
            return
        assert time.monotonic() < deadline, f"KV still held {timeout_s}s after the test: {held}"
        time.sleep(0.5)


def wait_replaced(dep, pool: str, old_id: str, timeout_s: float = 90.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ws = [w for w in workers(dep, pool) if w["healthy"] and w["worker_id"] != old_id]
        if ws:
            return ws[0]["worker_id"]
        time.sleep(0.2)
    raise TimeoutError(f"{pool} worker {old_id} not replaced within {timeout_s}s")


def test_decode_death_mid_stream_resumes(ray_session, llama_dir):
    """The only decode worker dies while streaming: the stream resumes on its replacement
    from the prompt and the tokens already sent, and the whole text equals the greedy
    text without the fault."""
    body = {"model": "tiny", "prompt": "import os", "max_tokens": 120, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    with serving(manifest_for(llama_dir)) as (url, dep):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
        expected = client.completions.create(**body).choices[0].text
        victim = workers(dep, "decode")[0]
        parts: list[str] = []
        killed = False
        for chunk in client.completions.create(**body, stream=True):
            parts.append(chunk.choices[0].text)
            if len(parts) == 5:
                os.kill(victim["stats"]["pid"], signal.SIGKILL)
                killed = True
        assert killed
        assert "".join(parts) == expected
        assert wait_replaced(dep, "decode", victim["worker_id"]) != victim["worker_id"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'splitserve_request_reroutes_total{stage="decode"} 1.0' in metrics, metrics

        # n = 2 choices with logprobs: both resume (one leads, the other forks its prompt
        # KV on the new worker), texts and token logprobs as without the fault.
        wait_healthy(url)
        many = {**body, "n": 2, "logprobs": 1, "max_tokens": 60}
        ref = client.completions.create(**many)
        victim = workers(dep, "decode")[0]
        texts, lps = ["", ""], [[], []]
        chunks = 0
        for chunk in client.completions.create(**many, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.text
                lps[c.index] += c.logprobs.token_logprobs if c.logprobs else []
            chunks += 1
            if chunks == 8:
                os.kill(victim["stats"]["pid"], signal.SIGKILL)
        assert chunks > 8
        for c in ref.choices:
            assert texts[c.index] == c.text
            assert lps[c.index] == pytest.approx(c.logprobs.token_logprobs, abs=1e-3)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'splitserve_request_reroutes_total{stage="decode"} 2.0' in metrics, metrics
        wait_kv_released(dep)


def test_colocated_death_before_first_token_is_rerouted(ray_session, llama_dir):
    """The colocated worker is dead before a request comes: the request waits for the
    replacement (within its deadline) and completes unchanged."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with serving(manifest_for(llama_dir, mode="colocated")) as (url, dep):
        expected = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        victim = workers(dep, "colocated")[0]
        ray.kill(victim["handle"], no_restart=True)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        wait_replaced(dep, "colocated", victim["worker_id"])
        wait_kv_released(dep)


def closed_loop_with_kills(url: str, dep, kills: list[str], prompts: list[str], body: dict,
                           threads: int = 2) -> tuple[dict[str, str], list[tuple[str, httpx.Response]]]:
    """A closed loop of `threads` clients over prompts; SIGKILL one worker of each pool in
    `kills`, in order, each once the loop is under way and the previous one was replaced
    and served requests again. Returns (expected text per prompt, every (prompt, response))."""
    with httpx.Client(timeout=120) as http:
        def complete(prompt: str) -> httpx.Response:
            return http.post(f"{url}/v1/completions", json={**body, "prompt": prompt})

        expected = {p: complete(p).json()["choices"][0]["text"] for p in prompts}
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
                    time.sleep(0.05)  # no busy loop of fast errors
                i += 1

        ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        try:
            for pool in kills:
                start = len(results)
                deadline = time.monotonic() + 120
                while len(results) < start + 4:  # under way
                    assert not raised and time.monotonic() < deadline, raised
                    time.sleep(0.01)
                victim = workers(dep, pool)[0]
                os.kill(victim["stats"]["pid"], signal.SIGKILL)
                killed_at = len(results)
                assert wait_replaced(dep, pool, victim["worker_id"], timeout_s=120) != victim["worker_id"]
                wait_healthy(url)
                deadline = time.monotonic() + 120
                while len(results) < killed_at + 4:  # served after the fault
                    assert not raised and time.monotonic() < deadline, raised
                    time.sleep(0.05)
        finally:
            stop.set()
            for t in ts:
                t.join(timeout=180)
        assert not raised, raised
        return expected, results


def test_prefill_worker_killed_under_load(ray_session, llama_dir):
    """SIGKILL of the only prefill worker's process while a closed loop of greedy requests
    runs: the requests it held wait for its replacement (within their deadline) and are
    re-sent; every request ends with the output it has without the fault."""
    prompts = [" ".join(f"def f{i}_{j}(x): return x + {j}" for j in range(40)) for i in range(4)]
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with serving(manifest_for(llama_dir)) as (url, dep):
        expected, results = closed_loop_with_kills(url, dep, ["prefill"], prompts, body)
        wait_kv_released(dep)
    statuses = [r.status_code for _, r in results]
    assert set(statuses) == {200}, [(r.status_code, r.text) for _, r in results if r.status_code != 200]
    for p, r in results:
        assert r.json()["choices"][0]["text"] == expected[p]


def test_demo_ha_prefill_then_decode_killed_loses_nothing(ray_session):
    """Done-when of issue 16 item 1: on demo-ha (2 prefill + 2 decode workers), a closed loop
    of greedy non-streamed requests; SIGKILL of one prefill worker's process, and later of
    one decode worker's: no request fails, no output changes."""
    prompts = [" ".join(f"def g{i}_{j}(y): return y * {j}" for j in range(20 + 5 * i)) for i in range(4)]
    body = {"model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with serving(demo_ha(f"test-ha-{os.getpid()}")) as (url, dep):
        expected, results = closed_loop_with_kills(url, dep, ["prefill", "decode"], prompts, body, threads=3)
        wait_kv_released(dep)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    bad = [(r.status_code, r.text) for _, r in results if r.status_code != 200]
    assert not bad, bad
    for p, r in results:
        assert r.json()["choices"][0]["text"] == expected[p]
    reroutes = [line for line in metrics.splitlines() if line.startswith("splitserve_request_reroutes_total")]
    print(f"{len(results)} requests, all 200 and unchanged; {reroutes}")
