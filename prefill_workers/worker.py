"""Prefill worker: computes prompt KV, samples the first token, hands the KV to the
transfer layer and returns a handle that the decode worker redeems."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster.worker_base import EngineWorker, current_node_ip
from engine.engine import StepOutput
from engine.scheduler import SchedulerConfig
from kvtransfer.connector import get_connector
from prefill_workers.scheduler import prefill_scheduler_config

logger = logging.getLogger(__name__)


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str = "prefill") -> None:
        super().__init__(worker_id, manifest_json, pool_name)
        self._node_ip = current_node_ip()
        kt = self.manifest.kv_transfer
        self.connector = get_connector(kt.transport, self._node_ip, kt.rate_limit_gbps, kt.codec)
        self._dest: dict[str, str | None] = {}
        self._sender = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{worker_id}-kv-send")
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._arrivals: dict[str, float] = {}

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return prefill_scheduler_config(self.pool.max_num_batched_tokens, self.pool.max_num_seqs,
                                        max_model_len)

    async def prefill(self, req: dict[str, Any]) -> dict[str, Any]:
        """req: request_id, prompt_token_ids, params (SamplingParams fields), and
        decode_node_ip (where the KV goes: picks the transport).

        Returns first_token, kv (a KVHandle), queue_s, prefill_s, num_cached_tokens."""
        rid = req["request_id"]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[rid] = fut
        self._arrivals[rid] = time.monotonic()
        self._dest[rid] = req.get("decode_node_ip")
        try:
            self._submit(rid, {"prompt_token_ids": req["prompt_token_ids"], "params": req["params"]})
            return await asyncio.wait_for(fut, timeout=self.manifest.server.request_timeout_s)
        except asyncio.TimeoutError:
            await self.abort(rid)
            raise TimeoutError(f"prefill of {rid} took longer than "
                               f"{self.manifest.server.request_timeout_s}s") from None
        finally:
            self._futures.pop(rid, None)
            self._arrivals.pop(rid, None)
            self._dest.pop(rid, None)

    def on_step(self, out: StepOutput) -> None:
        now = time.monotonic()
        for seq in out.finished:
            fut = self._futures.get(seq.request_id)
            kv = out.exported_kv.get(seq.request_id)
            if fut is None or fut.done() or kv is None:
                continue
            arrival = self._arrivals.get(seq.request_id, now)
            first = seq.first_scheduled_time or now
            result = {"first_token": seq.output_token_ids[0], "queue_s": first - arrival,
                      "prefill_s": now - first, "num_cached_tokens": seq.num_cached_tokens,
                      "worker_id": self.worker_id, "node_ip": self._node_ip}
            # Publishing the KV (a copy into the object store, or encoding for gRPC) runs
            # off the event loop and off the engine thread, beside the next prefill step.
            send = asyncio.get_running_loop().run_in_executor(
                self._sender, self.connector.send, seq.request_id, kv, self._dest.get(seq.request_id))
            send.add_done_callback(lambda f, fut=fut, result=result: self._sent(fut, result, f))

    async def inject_kv_fault(self, kind: str, count: int = 1) -> None:
        """Drills and tests: the next `count` gRPC KV streams from this worker are
        corrupted ("corrupt") or cut ("cut")."""
        if kind not in ("corrupt", "cut"):
            raise ValueError(f"unknown fault {kind!r}; allowed: corrupt, cut")
        self.connector.grpc._kv_server().fault = (kind, count)

    @staticmethod
    def _sent(fut: asyncio.Future[dict[str, Any]], result: dict[str, Any], send: asyncio.Future[Any]) -> None:
        if fut.done():
            return
        if send.exception() is not None:
            fut.set_exception(send.exception())  # type: ignore[arg-type]
        else:
            fut.set_result({**result, "kv": send.result()})

    def on_request_error(self, request_id: str, error: Exception) -> None:
        fut = self._futures.get(request_id)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def on_aborted(self, request_id: str) -> None:
        fut = self._futures.get(request_id)
        if fut is not None and not fut.done():
            fut.cancel()
