"""Decode worker: admits requests with their prompt KV into the running batch and
streams tokens back. Fed whole prompts (no KV), it is the colocated worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.channel import ChannelClosedError, Conn
from cluster.worker_base import EngineWorker, current_node_ip
from decode_workers.scheduler import decode_scheduler_config
from decode_workers.admission import receive_and_admit
from engine.engine import LLMEngine, StepOutput
from engine.scheduler import SchedulerConfig
from kvtransfer.connector import KVHandle, KVTransferError, get_connector
from kvtransfer.shm import detach_dead

logger = logging.getLogger(__name__)

_END = "end"
# A pushed arena handle (prefetch_kv): the slot is read at admission, not prefetched.
_ARENA_AT_ADMISSION = object()
# Seconds a finished prefetch waits for its request before it is dropped.
PREFETCH_KEEP_S = 10.0


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str = "decode") -> None:
        super().__init__(worker_id, manifest_json, pool_name)
        self.connector = get_connector(self.manifest.kv_transfer.transport, current_node_ip())
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        # Streamed transfers pulled before their request arrives: request id -> (task,
        # started at, sender address). Transfers seen recently, (request id, sender) ->
        # time, so a prefetch arriving after its request does not fetch again.
        self._prefetch: dict[str, tuple[asyncio.Future[Any], float, str, KVHandle]] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._done_at: dict[str, float] = {}  # request id -> when its prefetch was seen done
        # Requests waiting for the KV their prefill worker pushes (prefetch_kv).
        self._kv_waiters: dict[str, asyncio.Event] = {}
        # Requests that came over an ingress's channel: request id -> that channel, and
        # what the request's first message reports.
        self._routes: dict[str, Conn] = {}
        self._first_info: dict[str, dict[str, Any]] = {}
        self._ray_streams = 0  # requests streamed the old way, a Ray object per yield (generate)
        # Benchmarks only (set_kv_admission): write arriving KV on the engine thread, as
        # before decode_workers.admission, to measure the stall it caused side by side.
        self._admit_on_engine_thread = False
        # Pushed arena handles whose slot admission reads straight into reserved blocks.
        self._arena_deferred = 0

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return decode_scheduler_config(self.pool.max_num_batched_tokens, self.pool.max_num_seqs,
                                       max_model_len)

    def _fetch(self, handle: KVHandle, early: bool = False) -> asyncio.Future[Any]:
        # A prefetch starts before the prompt is even queued at the prefill worker: its
        # deadline also covers queueing and prefill. generate() bounds the wait after
        # the prefill to kv_transfer.timeout_s itself.
        deadline = self.manifest.kv_transfer.timeout_s
        if early:
            deadline += self.manifest.server.request_timeout_s
        return asyncio.ensure_future(asyncio.to_thread(self.connector.receive_detailed, handle, deadline))

    def _can_reserve(self) -> bool:
        """Whether arriving KV can be written into reserved blocks off the engine thread
        (splitserve's engine on one rank; not vLLM's, not tensor-parallel ranks)."""
        return self.settings.tp_size == 1 and isinstance(self.engine, LLMEngine) and not self._admit_on_engine_thread

    async def set_kv_admission(self, mode: str) -> None:
        """Benchmarks: "reserved" (the default: KV written into reserved blocks off the
        engine thread) or "engine_thread" (the engine writes it in before a step)."""
        if mode not in ("reserved", "engine_thread"):
            raise ValueError(f"unknown KV admission {mode!r}; allowed: reserved, engine_thread")
        self._admit_on_engine_thread = mode == "engine_thread"

    def _reap(self) -> None:
        now = time.monotonic()
        horizon = now - 2 * self.manifest.kv_transfer.timeout_s - 10
        for rid, (task, _, _, _) in list(self._prefetch.items()):
            if task.done():
                self._done_at.setdefault(rid, now)
        # A finished prefetch whose request has not come within PREFETCH_KEEP_S will not
        # come (its request failed or was aborted before reaching this worker).
        stale = [r for r, (t, t0, _, _) in self._prefetch.items()
                 if t.done() and (t0 < horizon or now - self._done_at.get(r, now) > PREFETCH_KEEP_S)]
        for rid in stale:
            task = self._prefetch.pop(rid)[0]
            self._done_at.pop(rid, None)
            if not task.cancelled() and task.exception() is None:
                logger.warning("dropping prefetched KV of %s: its request never came", rid)
        for rid in [r for r in self._done_at if r not in self._prefetch]:
            del self._done_at[rid]
        for key in [k for k, t0 in self._seen.items() if t0 < horizon]:
            del self._seen[key]

    async def health(self) -> dict[str, Any]:
        stats = await super().health()
        self._reap()
        stats["kv_shm_arenas_attached"] = detach_dead()  # unmaps arenas of prefill workers that died
        stats["kv_in_flight"] = sum(1 for task, _, _, _ in self._prefetch.values() if not task.done())
        stats["kv_transfers_held"] = len(self._prefetch)
        stats["ray_token_streams"] = self._ray_streams
        stats["kv_arena_read_at_admission"] = self._arena_deferred
        return stats

    async def prefetch_kv(self, handle: KVHandle) -> None:
        """Called by the prefill worker as its prefill starts: pull the streamed KV now,
        so that the network overlaps the prefill; or once its KV is in the object store,
        when the ingress gets a handle without the ref. ``_admit`` picks it up."""
        self._reap()
        key = (handle.request_id, str(handle.ref))
        if key not in self._seen:  # a retried prefill elsewhere replaces an older transfer
            self._seen[key] = time.monotonic()
            if handle.transport == "shm":
                # Same-node arena: nothing to pull early. Admission reads the slot straight
                # into the request's reserved blocks (one copy on this side, GIL released),
                # not into a private tensor first and then into blocks.
                task: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                task.set_result(_ARENA_AT_ADMISSION)
                self._arena_deferred += 1
            else:
                task = self._fetch(handle, early=True)
            self._prefetch[handle.request_id] = (task, time.monotonic(), str(handle.ref), handle)
            ev = self._kv_waiters.pop(handle.request_id, None)
            if ev is not None:
                ev.set()

    async def prefetch_failed(self, request_id: str, reason: str) -> None:
        """The prefill worker could not publish a request's KV it had promised (its
        ingress already has the first token): the request fails over here."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(KVTransferError(f"KV of {request_id} was not published: {reason}"))
        self._prefetch[request_id] = (fut, time.monotonic(), "failed", None)  # type: ignore[assignment]
        ev = self._kv_waiters.pop(request_id, None)
        if ev is not None:
            ev.set()

    async def _kv_task(self, rid: str, handle: KVHandle) -> tuple[asyncio.Future[Any] | None, KVHandle]:
        """The transfer that brings a request's KV, and its handle. A handle without a
        locator was pushed by the prefill worker (``prefetch_kv``), maybe not here yet."""
        if handle.ref is None:
            timeout = self.manifest.kv_transfer.timeout_s
            deadline = time.monotonic() + timeout
            while rid not in self._prefetch:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kv_waiters.pop(rid, None)
                    raise KVTransferError(f"KV of {rid} was not handed over by its prefill worker "
                                          f"within {timeout}s")
                ev = self._kv_waiters.setdefault(rid, asyncio.Event())
                try:
                    await asyncio.wait_for(ev.wait(), timeout=left)
                except asyncio.TimeoutError:
                    pass
            self._kv_waiters.pop(rid, None)
            task, _, _, pushed = self._prefetch.pop(rid)
            if (task.done() and not task.cancelled() and task.exception() is None
                    and task.result() is _ARENA_AT_ADMISSION):
                return None, pushed  # read by admission, straight into reserved blocks
            return task, pushed if pushed is not None else handle
        self._seen[(rid, str(handle.ref))] = time.monotonic()
        entry = self._prefetch.pop(rid, None)
        # Not prefetched: admission receives it (same-node shared memory straight into
        # reserved blocks where it can).
        task = entry[0] if entry is not None and entry[2] == str(handle.ref) else None
        return task, handle

    async def _admit(self, rid: str, req: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The engine's item for a request, with its KV landed; and what the first message
        reports (kv_receive_s, the transfer's figures)."""
        t0 = time.monotonic()
        item: dict[str, Any] = {"prompt_token_ids": req["prompt_token_ids"], "params": req["params"],
                                "output_token_ids": req.get("output_token_ids"),
                                "children": req.get("children")}
        handle: KVHandle | None = req.get("kv")
        info: dict[str, Any] = {"kv_receive_s": 0.0, "worker_id": self.worker_id}
        if handle is not None:
            task, handle = await self._kv_task(rid, handle)
            kv_timeout = self.manifest.kv_transfer.timeout_s
            try:
                # Into reserved blocks off the engine thread where it can (admission.py).
                got = await receive_and_admit(self.engine, self.connector, rid, item, handle, kv_timeout,
                                              self._can_reserve(), task)
            except asyncio.TimeoutError:
                raise KVTransferError(f"KV of {rid} did not land within {kv_timeout}s of its "
                                      "prefill finishing") from None
            info.update({"kv_receive_s": time.monotonic() - t0, "kv_bytes": got.nbytes,
                         "kv_tokens": got.kv_tokens, "kv_attempts": got.attempts, "kv_choices": got.choices})
            self.connector.release(handle)
        return item, info

    # -- requests over an ingress's channel (cluster.channel) -----------------------------
    # Every token of every request of one ingress leaves in that ingress's channel: one
    # frame per engine step, no Ray object per token.
    def channel_request(self, conn: Conn, msg: dict[str, Any]) -> None:
        if msg.get("op") != "decode":
            super().channel_request(conn, msg)
            return
        asyncio.ensure_future(self._decode_on(conn, msg["req"]))

    async def channel_submit(self, client_id: str, req: dict[str, Any]) -> None:
        """A request whose KV handle holds Ray object refs comes as a Ray call (refs travel
        as Ray arguments); its tokens go out on the ingress's channel all the same."""
        deadline = time.monotonic() + 5.0
        while True:
            conn = self._channel.conns.get(client_id) if self._channel is not None else None
            if conn is not None:
                break
            if time.monotonic() > deadline:
                raise ChannelClosedError(f"no channel from {client_id} at {self.worker_id}")
            await asyncio.sleep(0.005)
        asyncio.ensure_future(self._decode_on(conn, req))

    async def _decode_on(self, conn: Conn, req: dict[str, Any]) -> None:
        rid = req["request_id"]
        ids = [rid] + [cid for cid, _, _ in req.get("children") or ()]
        for i in ids:
            self._routes[i] = conn
        try:
            item, info = await self._admit(rid, req)
            if conn.closed or rid not in self._routes:  # the ingress went away or aborted
                if item.get("reserved") and self.engine is not None:
                    self.engine.release_reservation(rid)
                return
            for i in ids:
                self._first_info[i] = info
            self._submit(rid, item)
        except Exception as e:  # noqa: BLE001 - handed to the ingress
            for i in ids:
                self._unroute(i)
            conn.send({"request_id": rid, "error": e})

    def _unroute(self, rid: str) -> Conn | None:
        self._first_info.pop(rid, None)
        return self._routes.pop(rid, None)

    def channel_abort(self, request_id: str) -> None:
        self._unroute(request_id)
        super().channel_abort(request_id)

    def channel_closed(self, conn: Conn) -> None:
        for rid in [r for r, c in self._routes.items() if c is conn]:
            self._unroute(rid)
            self._pending.append(("abort", rid, None))
        self._work.set()

    async def generate(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream a request's tokens (call with num_returns="streaming"): one Ray object per
        yield. The ingress uses its channel instead (SPLITSERVE_CHANNEL=0 brings this back).

        req: request_id, prompt_token_ids, params; for a disaggregated request also
        output_token_ids (the first token, sampled by prefill) and kv (a KVHandle); for
        further choices of the prompt (n > 1) children: (request id, params, output ids or
        None), which fork the prompt's KV. Yields {"request_id", "token_ids": [...],
        "finish_reason": str|None, ...} until every choice finished; the first item also
        carries kv_receive_s and queue_s."""
        self._ray_streams += 1
        rid = req["request_id"]
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        ids = [rid] + [cid for cid, _, _ in req.get("children") or ()]
        for i in ids:
            self._queues[i] = queue
        open_ids = set(ids)
        finished = False
        item: dict[str, Any] = {}
        try:
            item, info = await self._admit(rid, req)
            self._submit(rid, item)
            first = True
            timeout = self.manifest.server.token_timeout_s
            while open_ids:
                try:
                    msgs = [await asyncio.wait_for(queue.get(), timeout=timeout)]
                except asyncio.TimeoutError:
                    raise TimeoutError(f"no token for {rid} within {timeout}s") from None
                # Batch whatever else is already queued: one message per request id.
                while not queue.empty():
                    msgs.append(queue.get_nowait())
                grouped: dict[str, dict[str, Any]] = {}
                for msg in msgs:
                    if "error" in msg:
                        raise msg["error"]
                    g = grouped.setdefault(msg["request_id"], {"request_id": msg["request_id"],
                                                               "token_ids": [], "finish_reason": None})
                    g["token_ids"] += msg.get("token_ids", [])
                    if msg.get("logprobs"):
                        g.setdefault("logprobs", []).extend(msg["logprobs"])
                    if msg.get("prompt_logprobs") is not None:
                        g["prompt_logprobs"] = msg["prompt_logprobs"]
                    g["finish_reason"] = msg.get("finish_reason") or g["finish_reason"]
                for out in grouped.values():
                    if first:
                        out.update(info)
                        first = False
                    if out["finish_reason"] is not None:
                        open_ids.discard(out["request_id"])
                    yield out
            finished = True
        finally:
            if item.get("reserved") and self.engine is not None:
                self.engine.release_reservation(rid)  # a no-op once the engine took the request
            for i in ids:
                self._queues.pop(i, None)
            if not finished:
                for i in open_ids:
                    await self.abort(i)

    def on_step(self, out: StepOutput) -> None:
        finished = {s.request_id: s.finish_reason for s in out.finished}
        for rid, token in out.new_tokens.items():
            conn = self._routes.get(rid)
            q = self._queues.get(rid) if conn is None else None
            if conn is None and q is None:
                continue
            reason = finished.get(rid)
            msg: dict[str, Any] = {"request_id": rid, "token_ids": [token], "finish_reason": reason}
            if rid in out.new_logprobs:
                msg["logprobs"] = [out.new_logprobs[rid]]
            if rid in out.prompt_logprobs:
                msg["prompt_logprobs"] = out.prompt_logprobs[rid]
            if conn is not None:
                info = self._first_info.pop(rid, None)
                if info is not None and not info.get("sent"):
                    info["sent"] = True
                    msg.update({k: v for k, v in info.items() if k != "sent"})
                if reason is not None:
                    self._unroute(rid)
                conn.send(msg)  # all of this step's messages to one ingress: one frame
            else:
                assert q is not None
                q.put_nowait(msg)

    def on_request_error(self, request_id: str, error: Exception) -> None:
        conn = self._unroute(request_id)
        if conn is not None:
            conn.send({"request_id": request_id, "error": error})
            return
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait({"request_id": request_id, "error": error})

    def on_aborted(self, request_id: str) -> None:
        msg = {"request_id": request_id, "token_ids": [], "finish_reason": "abort"}
        conn = self._unroute(request_id)
        if conn is not None:
            conn.send(msg)
            return
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(msg)


class ColocatedWorker(DecodeWorker):
    """Prefill and decode in one engine with chunked prefill: the baseline layout."""

    role = "colocated"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str = "colocated") -> None:
        super().__init__(worker_id, manifest_json, pool_name)
