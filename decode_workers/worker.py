"""Decode worker: admits requests with their prompt KV into the running batch and
streams tokens back. Fed whole prompts (no KV), it is the colocated worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.worker_base import EngineWorker, current_node_ip
from decode_workers.scheduler import decode_scheduler_config
from decode_workers.admission import receive_and_admit
from engine.engine import LLMEngine, StepOutput
from engine.scheduler import SchedulerConfig
from kvtransfer.connector import KVHandle, KVTransferError, get_connector
from kvtransfer.shm import detach_dead

logger = logging.getLogger(__name__)

_END = "end"
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
        self._prefetch: dict[str, tuple[asyncio.Future[Any], float, str]] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._done_at: dict[str, float] = {}  # request id -> when its prefetch was seen done
        # Benchmarks only (set_kv_admission): write arriving KV on the engine thread, as
        # before decode_workers.admission, to measure the stall it caused side by side.
        self._admit_on_engine_thread = False

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
        for rid, (task, _, _) in list(self._prefetch.items()):
            if task.done():
                self._done_at.setdefault(rid, now)
        # A finished prefetch whose request has not come within PREFETCH_KEEP_S will not
        # come (its request failed or was aborted before reaching this worker).
        stale = [r for r, (t, t0, _) in self._prefetch.items()
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
        stats["kv_in_flight"] = sum(1 for task, _, _ in self._prefetch.values() if not task.done())
        stats["kv_transfers_held"] = len(self._prefetch)
        return stats

    async def prefetch_kv(self, handle: KVHandle) -> None:
        """Called by the prefill worker as its prefill starts: pull the streamed KV now,
        so that the network overlaps the prefill; ``generate`` picks it up."""
        self._reap()
        key = (handle.request_id, str(handle.ref))
        if key not in self._seen:  # a retried prefill elsewhere replaces an older transfer
            self._seen[key] = time.monotonic()
            self._prefetch[handle.request_id] = (self._fetch(handle, early=True), time.monotonic(),
                                                 str(handle.ref))

    async def generate(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream a request's tokens (call with num_returns="streaming").

        req: request_id, prompt_token_ids, params; for a disaggregated request also
        output_token_ids (the first token, sampled by prefill) and kv (a KVHandle); for
        further choices of the prompt (n > 1) children: (request id, params, output ids or
        None), which fork the prompt's KV. Yields {"request_id", "token_ids": [...],
        "finish_reason": str|None, ...} until every choice finished; the first item also
        carries kv_receive_s and queue_s."""
        rid = req["request_id"]
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        ids = [rid] + [cid for cid, _, _ in req.get("children") or ()]
        for i in ids:
            self._queues[i] = queue
        open_ids = set(ids)
        finished = False
        item: dict[str, Any] = {}
        try:
            t0 = time.monotonic()
            item = {"prompt_token_ids": req["prompt_token_ids"], "params": req["params"],
                    "output_token_ids": req.get("output_token_ids"), "children": req.get("children")}
            handle: KVHandle | None = req.get("kv")
            kv_s = 0.0
            kv_info: dict[str, Any] = {}
            if handle is not None:
                self._seen[(rid, str(handle.ref))] = time.monotonic()
                entry = self._prefetch.pop(rid, None)
                task = entry[0] if entry is not None and entry[2] == str(handle.ref) else None
                kv_timeout = self.manifest.kv_transfer.timeout_s
                try:
                    # Into reserved blocks off the engine thread where it can (admission.py).
                    got = await receive_and_admit(self.engine, self.connector, rid, item, handle, kv_timeout,
                                                  self._can_reserve(), task)
                except asyncio.TimeoutError:
                    raise KVTransferError(f"KV of {rid} did not land within {kv_timeout}s of its "
                                          "prefill finishing") from None
                kv_s = time.monotonic() - t0
                kv_info = {"kv_bytes": got.nbytes, "kv_tokens": got.kv_tokens,
                           "kv_attempts": got.attempts, "kv_choices": got.choices}
                self.connector.release(handle)
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
                        out["kv_receive_s"] = kv_s
                        out["worker_id"] = self.worker_id
                        out.update(kv_info)
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
            q = self._queues.get(rid)
            if q is not None:
                msg: dict[str, Any] = {"request_id": rid, "token_ids": [token],
                                       "finish_reason": finished.get(rid)}
                if rid in out.new_logprobs:
                    msg["logprobs"] = [out.new_logprobs[rid]]
                if rid in out.prompt_logprobs:
                    msg["prompt_logprobs"] = out.prompt_logprobs[rid]
                q.put_nowait(msg)

    def on_request_error(self, request_id: str, error: Exception) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait({"request_id": request_id, "error": error})

    def on_aborted(self, request_id: str) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait({"request_id": request_id, "token_ids": [], "finish_reason": "abort"})


class ColocatedWorker(DecodeWorker):
    """Prefill and decode in one engine with chunked prefill: the baseline layout."""

    role = "colocated"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str = "colocated") -> None:
        super().__init__(worker_id, manifest_json, pool_name)
