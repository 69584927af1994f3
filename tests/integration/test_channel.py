"""Tokens and prefill calls travel in one channel per (worker, ingress) (cluster/channel.py),
not as Ray objects: an engine step's tokens for all of an ingress's requests leave in one
frame; no per-request Ray generator is opened; the Ray path (SPLITSERVE_CHANNEL=0) gives
the same greedy text; a connection with a wrong token is refused."""

from __future__ import annotations

import asyncio

import openai
import pytest
import ray

from .conftest import manifest_for, serving

TOKENS = 24


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def served(request, ray_session, llama_dir):
    # KV through the object store (not the same-node arena, the default): what the
    # prefill worker pushes to the decode worker (prefetch_kv) or holds for the ingress
    # (take_kv) is an ObjectRef; the arena's handles travel in the channel as they are
    # (tests/integration/test_shm_kv.py).
    kv = {"codec": "none", "transport": "object_store"}
    with serving(manifest_for(llama_dir, mode=request.param, kv_transfer=kv)) as (url, dep):
        yield url, dep, request.param, openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)


def _worker(dep, mode):
    pool = "decode" if mode == "disaggregated" else "colocated"
    return next(iter(dep.ingress.router.pools[pool].values()))


def _health(w) -> dict:
    return ray.get(w.handle.health.remote(), timeout=30)


def test_one_frame_per_step_for_all_choices(served):
    url, dep, mode, client = served
    w = _worker(dep, mode)
    before = _health(w)
    got = client.completions.create(model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=TOKENS, n=4, seed=3,
                                     temperature=1.0, stream=True,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    tokens = sum(len(c.choices[0].token_ids or []) for c in got)
    after = _health(w)
    frames = after["channel_frames"] - before["channel_frames"]
    msgs = after["channel_messages"] - before["channel_messages"]
    assert tokens == 4 * TOKENS
    # Every token the worker sampled went out as a channel message (disaggregated: the
    # prefill worker sampled each choice's first token).
    assert msgs >= tokens - (4 if mode == "disaggregated" else 0)
    # The four choices decode in the same steps: their tokens share frames.
    assert frames * 3 <= msgs, (frames, msgs)
    # No Ray generator per request, ever.
    assert after["ray_token_streams"] == 0
    ingress = dep.ingress.gen.channels.stats()
    assert ingress["messages"] >= msgs


def test_ray_path_gives_the_same_text(served):
    url, dep, mode, client = served
    kw = dict(model="tiny", prompt=[11, 12, 13, 14], max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    via_channel = client.completions.create(**kw).choices[0].token_ids
    gen = dep.ingress.gen
    channels, gen.channels = gen.channels, None
    try:
        via_ray = client.completions.create(**kw).choices[0].token_ids
        streamed = [t for c in client.completions.create(stream=True, **kw) for t in (c.choices[0].token_ids or [])]
    finally:
        gen.channels = channels
    assert via_ray == via_channel == streamed
    assert _health(_worker(dep, mode))["ray_token_streams"] >= 1


def test_wrong_token_is_refused(served):
    url, dep, mode, client = served
    w = _worker(dep, mode)
    info = ray.get(w.handle.channel_info.remote(), timeout=30)

    async def attempt() -> bytes:
        reader, writer = await asyncio.open_connection(info["host"], info["port"])
        writer.write(b"0" * len(info["token"]) + b"\x00\x00\x00\x01x")
        # A frame that would be unpickled if the token were accepted.
        writer.write(b"\x00\x00\x00\x04junk")
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(100), timeout=10)
        except ConnectionResetError:  # closed while our junk frame was still unread: a reset, not a FIN
            data = b""
        writer.close()
        return data

    assert asyncio.run(attempt()) == b""  # closed without an answer
    out = client.completions.create(model="tiny", prompt=[3, 4], max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length"


def test_prefill_worker_without_decode_handles_hands_kv_through_ingress(served):
    """A prefill worker that does not know the decode worker yet (no controller snapshot)
    keeps the object-store KV for the ingress (take_kv), which sends it to the decode worker
    as a Ray argument (channel_submit); the text is the same."""
    url, dep, mode, client = served
    if mode != "disaggregated":
        pytest.skip("no prefill worker")
    kw = dict(model="tiny", prompt=[21, 22, 23, 24, 25], max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    want = client.completions.create(**kw).choices[0].token_ids
    pw = next(iter(dep.ingress.router.pools["prefill"].values()))
    ray.get(pw.handle.cluster_state.remote({"pools": {}}), timeout=30)
    taken = _health(pw)["kv_taken_by_ingress"]
    got = client.completions.create(**kw).choices[0].token_ids
    assert got == want
    assert _health(pw)["kv_taken_by_ingress"] == taken + 1
    assert _health(_worker(dep, mode))["kv_transfers_held"] == 0
