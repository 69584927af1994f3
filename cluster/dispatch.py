"""How the ingress talks to a worker for one request: the prefill call, and the stream of a
decode (colocated) worker's tokens. Over the worker's channel (cluster.channel: one TCP
stream per worker and ingress, one frame per engine step), or, with no channel pool
(SPLITSERVE_CHANNEL=0), as Ray calls: an awaited actor call and a Ray generator per
request (a Ray object per yield). Every wait has a timeout; errors propagate as raised
(the Generator maps them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import ray

from cluster.channel import yield_cpu
from cluster.channel_client import ChannelPool, Mailbox
from cluster.router import WorkerView
from kvtransfer.base import KVHandle


async def call_prefill(channels: ChannelPool | None, w: WorkerView, payload: dict[str, Any],
                       timeout_s: float) -> dict[str, Any]:
    """The prefill worker's result for payload (see PrefillWorker.prefill)."""
    if channels is None:
        return await asyncio.wait_for(w.handle.prefill.remote(payload), timeout=timeout_s)
    payload = {k: v for k, v in payload.items() if k != "decode_actor"}  # the worker resolves decode_worker
    rid = payload["request_id"]
    ch = await channels.get(w.worker_id, w.handle)
    q = Mailbox()
    ch.register(rid, q)
    ok = False
    try:
        await ch.send({"op": "prefill", "request_id": rid, "req": payload}, timeout_s)
        yield_cpu()  # the worker, woken onto this CPU by the write, takes the request first
        msg = await q.get(timeout_s)
        ok = True
    finally:
        ch.unregister(rid)
        if not ok:  # timed out or the client went away: the worker need not go on
            ch.send_nowait({"op": "abort", "request_id": rid})
    if "error" in msg:
        raise msg["error"]
    res: dict[str, Any] = msg["result"]
    stub = res.pop("kv_stub", None)
    if stub is not None:  # an early reply: the handle's fields, its ref on the way to the decode worker
        res["kv"] = KVHandle(*stub, None)
    if res.get("kv_pull"):  # no decode worker was known there: the ref comes as a Ray reply
        res["kv"] = await asyncio.wait_for(w.handle.take_kv.remote(rid), timeout=timeout_s)
    return res


def release_kv(channels: ChannelPool | None, w: WorkerView, request_id: str) -> None:
    """Tell a prefill worker that it need not keep a request's KV (fire and forget): over
    its channel when one is open (a message, ~0.01 ms), else a Ray call (~0.5 ms of this
    process's time, which was most of the ingress's own time per request)."""
    if channels is not None:
        ch = channels.clients.get(w.worker_id)
        if ch is not None and not ch.closed:
            ch.send_nowait({"op": "release_kv", "request_id": request_id})
            return
    w.handle.release_kv.remote(request_id)


def token_stream(channels: ChannelPool | None, w: WorkerView, payload: dict[str, Any],
                 timeout_s: float) -> AsyncIterator[dict[str, Any]]:
    """The worker's messages for the request and its further choices, until all finished
    (see DecodeWorker.generate for their fields); closing it early aborts them."""
    if channels is None:
        return _ray_stream(w, payload, timeout_s)
    return _channel_stream(channels, w, payload, timeout_s)


async def _ray_stream(w: WorkerView, payload: dict[str, Any], timeout: float) -> AsyncIterator[dict[str, Any]]:
    gen = w.handle.generate.options(num_returns="streaming").remote(payload)
    open_ids = {payload["request_id"]} | {c[0] for c in payload.get("children") or ()}
    done = False
    try:
        while True:
            try:
                ref = await asyncio.wait_for(gen.__anext__(), timeout=timeout)
            except StopAsyncIteration:
                return
            msg = await asyncio.wait_for(ref, timeout=timeout)
            if msg.get("finish_reason") is not None:
                open_ids.discard(msg.get("request_id", payload["request_id"]))
            done = not open_ids
            yield msg
            if done:
                return
    finally:
        if not done:
            try:
                for rid in open_ids:
                    w.handle.abort.remote(rid)
                ray.cancel(gen)
            except Exception:  # noqa: BLE001 - the worker may be dead
                pass


async def _channel_stream(channels: ChannelPool, w: WorkerView, payload: dict[str, Any],
                          timeout: float) -> AsyncIterator[dict[str, Any]]:
    """The request's messages from the worker's channel, which carries every request of
    this ingress on that worker. A closed channel (the worker died) raises
    ChannelClosedError, a ConnectionError: the Generator resumes elsewhere."""
    ids = [payload["request_id"]] + [c[0] for c in payload.get("children") or ()]
    open_ids = set(ids)
    ch = await channels.get(w.worker_id, w.handle)
    q = Mailbox()
    for rid in ids:
        ch.register(rid, q)
    done = False
    try:
        kv = payload.get("kv")
        if kv is not None and isinstance(kv.ref, ray.ObjectRef):  # refs travel as Ray arguments
            await asyncio.wait_for(w.handle.channel_submit.remote(channels.client_id, payload), timeout=timeout)
        else:
            await ch.send({"op": "decode", "request_id": payload["request_id"], "req": payload}, timeout)
        while True:
            msg = await q.get(timeout)
            if "error" in msg:
                raise msg["error"]
            if msg.get("finish_reason") is not None:
                open_ids.discard(msg["request_id"])
            done = not open_ids
            yield msg
            if done:
                return
    finally:
        for rid in ids:
            ch.unregister(rid)
        if not done:
            for rid in open_ids:
                ch.send_nowait({"op": "abort", "request_id": rid})
