"""Same-node KV through the prefill worker's shared-memory arena (kvtransfer/shm.py), served
end to end: greedy output equals the object-store path and transformers; a full arena
falls back to the object store; aborts leave neighbours unchanged and every slot and
block released; a killed prefill worker's requests complete elsewhere and its arena is
gone (no file, no mapping left in the decode worker)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import pytest
import ray

from kvtransfer.shm import FILE_PREFIX, SHM_DIR

from .conftest import manifest_for, serving
from .test_failures import closed_loop_with_kills, wait_kv_released, workers
from .test_serving_equivalence import prompts, reference, served


@pytest.fixture(scope="module")
def case(llama_dir):
    vocab = json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    ps = prompts(vocab)[:10]
    return ps, reference(llama_dir, ps)


def prefill_stats(dep, until=None, timeout_s: float = 20.0) -> dict:
    """The live prefill worker's health stats (as the controller last polled them), once
    ``until(stats)`` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = [w for w in workers(dep, "prefill") if w["healthy"]][0]["stats"]
        if until is None or until(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def transfers_by_transport(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("splitserve_kv_transfers_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('transport="')[1].split('"')[0]] = float(value)
    return out


def test_arena_matches_object_store_and_transformers(ray_session, llama_dir, case):
    ps, ref = case
    outs = {}
    for transport in ("auto", "object_store"):
        with serving(manifest_for(llama_dir, kv_transfer={"transport": transport})) as (url, dep):
            outs[transport] = asyncio.run(served(url, ps))
            stats = prefill_stats(dep, lambda s: s.get("kv_shm_puts", 0) + s.get("kv_shm_fallbacks", 0) >= len(ps))
            by = transfers_by_transport(url)
            if transport == "auto":
                assert stats["kv_shm_puts"] >= len(ps) and stats["kv_shm_fallbacks"] == 0
                assert by.get("shm", 0) >= len(ps) and not by.get("object_store"), by
                # Pushed arena handles are read at admission, straight into reserved blocks
                # (no private copy first).
                decode = [w for w in workers(dep, "decode") if w["healthy"]][0]["handle"]
                dstats = ray.get(decode.health.remote(), timeout=30)
                assert dstats["kv_arena_read_at_admission"] >= len(ps), dstats
            else:
                assert "kv_shm_puts" not in stats  # no arena when the object store is pinned
                assert by.get("object_store", 0) >= len(ps) and not by.get("shm"), by
            wait_kv_released(dep)
    assert outs["auto"] == ref
    assert outs["object_store"] == ref


def test_full_arena_falls_back_and_aborts_release_everything(ray_session, llama_dir, case):
    ps, ref = case
    # ~1 KB of KV per token: 0.03 MiB holds one prompt of up to ~25 tokens at a time, so
    # longer prompts (and concurrent ones) go through the object store.
    m = manifest_for(llama_dir, kv_transfer={"shm_arena_mb": 0.03})
    victims = [" ".join(f"z{i}_{j}" for j in range(6 + i)) for i in range(8)]
    body = {"model": "tiny", "temperature": 0, "ignore_eos": True}
    with serving(m) as (url, dep):
        got = asyncio.run(served(url, ps))
        stats = prefill_stats(dep, lambda s: s["kv_shm_puts"] + s["kv_shm_fallbacks"] >= len(ps))
        assert stats["kv_shm_puts"] > 0 and stats["kv_shm_fallbacks"] > 0, stats
        assert got == ref
        errors: list[BaseException] = []

        def victim(p: str) -> None:
            # Leave at the first chunk: the decode side aborts while the KV may be in flight.
            try:
                with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                                  json={**body, "prompt": p, "max_tokens": 64, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            return
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(e)

        again: list[list[list[int]]] = []
        threads = [threading.Thread(target=victim, args=(p,)) for p in victims]
        threads.append(threading.Thread(target=lambda: again.append(asyncio.run(served(url, ps)))))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors
        assert again == [ref]  # neighbours of the aborted requests: unchanged
        wait_kv_released(dep)  # blocks and arena slots: all back
        assert prefill_stats(dep, lambda s: s["kv_shm_slots_held"] == 0)["kv_shm_slots_held"] == 0


def test_killed_prefill_worker_leaves_no_arena(ray_session, llama_dir):
    before = {f for f in os.listdir(SHM_DIR) if f.startswith(FILE_PREFIX)}
    prompts_ = [" ".join(f"def f{i}_{j}(x): return x + {j}" for j in range(30)) for i in range(4)]
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with serving(manifest_for(llama_dir)) as (url, dep):
        dead_pid = prefill_stats(dep)["pid"]
        expected, results = closed_loop_with_kills(url, dep, ["prefill"], prompts_, body)
        wait_kv_released(dep)
        stats = prefill_stats(dep, lambda s: s["pid"] != dead_pid and s["kv_shm_puts"] > 0)
        assert stats["pid"] != dead_pid and stats["kv_shm_puts"] > 0  # the replacement serves through its arena
        decode = [w for w in workers(dep, "decode") if w["healthy"]][0]["stats"]
        assert decode["kv_shm_arenas_attached"] == 1  # the dead worker's arena was unmapped
    bad = [(r.status_code, r.text) for _, r in results if r.status_code != 200]
    assert not bad, bad
    for p, r in results:
        assert r.json()["choices"][0]["text"] == expected[p]
    left = {f for f in os.listdir(SHM_DIR) if f.startswith(FILE_PREFIX)} - before
    assert not left, left
    assert not [f for f in before if f.startswith(f"{FILE_PREFIX}{dead_pid}-")]
