"""Prefill worker: computes prompt KV, samples the first token, hands the KV to the
transfer layer and returns a handle that the decode worker redeems.

Across nodes (gRPC) the KV streams layer by layer while the prompt is computed: the
transfer is opened before the prompt is queued, the decode worker is told to start
pulling at once (``prefetch_kv``), and each layer's KV goes to the sender as the engine
writes it. Within a node the finished KV goes into this worker's shared-memory arena
(``kvtransfer.shm``, pre-faulted at start, sized from the manifest), or the object store
when the arena is full."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster.channel import Conn
from cluster.worker_base import EngineWorker, current_node_ip
from engine.engine import StepOutput
from engine.scheduler import SchedulerConfig
from kvtransfer.connector import GrpcConnector, KVHandle, get_connector
from kvtransfer.policy import PolicySpec, TransferPolicy
from prefill_workers.kv_hold import KVHoldMixin
from prefill_workers.scheduler import prefill_scheduler_config

logger = logging.getLogger(__name__)


class PrefillWorker(KVHoldMixin, EngineWorker):
    role = "prefill"

    def __init__(self, worker_id: str, manifest_json: str, pool_name: str = "prefill") -> None:
        super().__init__(worker_id, manifest_json, pool_name)
        self._node_ip = current_node_ip()
        kt = self.manifest.kv_transfer
        budget_ms = kt.budget_ms if kt.budget_ms is not None else self.manifest.slo.ttft_ms
        self.policy = TransferPolicy(PolicySpec(kt.codec, kt.level, kt.chunk_tokens, kt.allow_recompute,
                                                budget_ms / 1000.0, kt.max_quality_loss, kt.adaptive_lossy))
        self.connector = get_connector(kt.transport, self._node_ip, kt.rate_limit_gbps, self.policy)
        self._dest: dict[str, str | None] = {}
        self._sender = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{worker_id}-kv-send")
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._arrivals: dict[str, float] = {}
        # Requests whose KV streams layer-wise over gRPC, with their handles.
        self._streams: dict[str, KVHandle] = {}
        self._kv_shape: tuple[int, int, int] = (0, 0, 0)  # layers, kv heads, head dim
        self._probe: str | None = None  # the internal request that samples KV for profiling
        self._children: dict[str, set[str]] = {}  # request id -> its further choices' ids
        # Every worker's actor handle by id (the controller's snapshot): where to push KV.
        self._handles: dict[str, Any] = {}
        # KV handles with object refs that no decode worker was found for: request id ->
        # (handle, when); the ingress takes them with take_kv.
        self._held: dict[str, tuple[KVHandle, float]] = {}
        # Channel requests whose result goes to the ingress as soon as the engine finishes
        # (request id -> its channel); the KV follows to the decode worker.
        self._early: dict[str, Conn] = {}
        self._kv_taken = 0  # handles the ingress took with take_kv

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return prefill_scheduler_config(self.pool.max_num_batched_tokens, self.pool.max_num_seqs,
                                        max_model_len)

    async def start(self) -> dict[str, Any]:
        if self.engine is not None:
            return await self.health()
        from engine.config import ModelConfig

        await super().start()
        cfg = ModelConfig.from_dir(self.settings.model_dir)
        self._kv_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        assert self.engine is not None
        self._start_arena()
        if self.settings.tp_size == 1:
            sender = self.connector.grpc.sender
            self.engine.runner.on_layer_kv = sender.add
        if self.policy.adaptive:
            tokens = max(16, min(512, self.settings.num_blocks * self.settings.block_size // 2))
            try:
                await self._profile_codecs(tokens)
            except Exception as e:  # noqa: BLE001 - the worker still serves, and says so
                # Serving goes on with the built-in DEFAULT_PROFILE figures (transfers refine
                # them); health() and splitserve_worker_kv_codec_profile_measured say so.
                self.policy.profile_error = f"{type(e).__name__}: {e}"
                logger.warning("%s could not profile the KV codecs (%s); the adaptive codec plans with the "
                               "built-in DEFAULT_PROFILE until transfers refine it", self.worker_id,
                               self.policy.profile_error)
        return await self.health()

    async def _load_kv_calibration(self) -> None:
        await super()._load_kv_calibration()
        if self.kvtc_costs:  # kvtc's levels cost what the model's calibration measured
            self.policy.set_costs(self.kvtc_costs)  # before the engine starts: a pinned level above the floor fails

    async def health(self) -> dict[str, Any]:
        stats = await super().health()
        stats.update(self.policy.profile_status())
        # Age of the oldest prompt not yet prefilled (the autoscaler's queueing vs TTFT).
        now = time.monotonic()
        stats["queue_wait_s"] = max((now - t for rid, t in list(self._arrivals.items()) if rid != self._probe),
                                    default=0.0)
        server = GrpcConnector._server
        held = 0
        if server is not None:
            server.sweep()
            held = server.held()
            stats["kv_server"] = server.address
            stats["kv_server_authenticated"] = bool(server.token)
            stats["kv_server_tls"] = server.tls
            stats["kv_fetch_refused"] = server.refused
        arena = self.connector.shm.arena
        if arena is not None:
            slots = arena.held()
            held += slots
            stats["kv_shm_slots_held"] = slots
            stats["kv_shm_free_bytes"] = arena.free_bytes()
            stats["kv_shm_puts"] = arena.puts
            stats["kv_shm_fallbacks"] = self.connector.shm.fallbacks
        stats["kv_transfers_held"] = held
        stats["kv_taken_by_ingress"] = self._kv_taken
        return stats

    async def cluster_state(self, state: dict[str, Any]) -> None:
        self._handles = {w["worker_id"]: w["handle"] for ws in state["pools"].values() for w in ws}

    # -- requests over an ingress's channel (cluster.channel) -----------------------------
    def channel_request(self, conn: Conn, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "release_kv":  # fire and forget, as release_kv.remote
            asyncio.ensure_future(self.release_kv(msg["request_id"]))
            return
        if op != "prefill":
            super().channel_request(conn, msg)
            return
        # The request reaches the engine in this event-loop turn (the one its bytes arrived
        # in), not in a task's first step one turn later.
        req = msg["req"]
        rid = req["request_id"]
        # Requests that end at their first token (max_tokens 1) never reach a decode worker.
        decodes = any(int(p.get("max_tokens") or 2) > 1
                      for p in [req["params"]] + [c[1] for c in req.get("children") or ()])
        decode = self._handles.get(req.get("decode_worker") or "") if decodes else None
        early = decode is not None or not decodes
        if early:
            self._early[rid] = conn
        begun: float | BaseException
        try:
            begun = self._begin_prefill(req)
        except Exception as e:  # noqa: BLE001 - answered by _prefill_on, as a failed prefill()
            begun = e
        asyncio.ensure_future(self._prefill_on(conn, req, decodes, decode, early, begun))

    async def _prefill_on(self, conn: Conn, req: dict[str, Any], decodes: bool, decode: Any, early: bool,
                          begun: float | BaseException) -> None:
        """prefill() for a request that came over a channel (begun by channel_request: when
        it arrived, or why it could not start); the result goes back on it.
        A KV handle holding a Ray object ref cannot travel in the channel: the KV is pushed
        to the decode worker (prefetch_kv) and the ingress gets the handle without the
        ref, at once when the engine finishes (publishing the KV overlaps the reply and
        the decode request). With no decode worker known, the ingress takes the handle
        with take_kv."""
        import ray

        rid = req["request_id"]
        try:
            if isinstance(begun, BaseException):
                raise begun
            res = await self._end_prefill(rid, begun)
        except asyncio.CancelledError:
            res = RuntimeError(f"prefill of {rid} was aborted")
        except Exception as e:  # noqa: BLE001 - handed to the ingress (or the decode worker)
            res = e
        replied = self._early.pop(rid, None) is None and early
        if replied:  # the ingress has its result: the KV, or why it failed, goes to decode
            if decode is None:  # ends at its first token: no one reads the KV
                if not isinstance(res, BaseException):
                    self._drop_kv(res["kv"])
                return
            if isinstance(res, BaseException):
                decode.prefetch_failed.remote(rid, f"{type(res).__name__}: {res}")
            else:
                asyncio.ensure_future(self._push_kv(decode, res["kv"]))
            return
        if isinstance(res, BaseException):
            conn.send({"request_id": rid, "error": res})
            return
        handle: KVHandle = res["kv"]
        if isinstance(handle.ref, ray.ObjectRef):
            if decode is not None:
                decode.prefetch_kv.remote(handle)
            elif not decodes:
                pass
            else:
                self._sweep_held()
                self._held[rid] = (handle, time.monotonic())
                res["kv_pull"] = True
            res["kv"] = dataclasses.replace(handle, ref=None)
        conn.send({"request_id": rid, "result": res})

    async def _profile_codecs(self, tokens: int = 512) -> None:
        """Measure the adaptive options on this model's own KV (one internal prefill) and
        the prefill speed; transfers refine both."""
        from kvtransfer.adaptive import profile_options

        rid = f"__kv-profile-{self.worker_id}"
        vocab = self.engine.runner.model.cfg.vocab_size  # type: ignore[union-attr]
        prompt = [(i * 7919 + 13) % (vocab - 2) + 1 for i in range(tokens)]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[rid] = fut
        self._arrivals[rid] = time.monotonic()
        self._dest[rid] = None
        self._probe = rid
        try:
            self._submit(rid, {"prompt_token_ids": prompt, "params": {"max_tokens": 1, "temperature": 0.0}})
            res = await asyncio.wait_for(fut, timeout=120)
        finally:
            self._futures.pop(rid, None)
            self._arrivals.pop(rid, None)
            self._dest.pop(rid, None)
        kv = res["kv_tensor"]
        self.policy.s_per_token = res["prefill_s"] / tokens
        opts = await asyncio.to_thread(profile_options, kv, self.policy.spec.labels(), 2,
                                        self.policy.spec.chunk_tokens, self.policy.spec.measured)
        self.policy.set_measured(opts)
        logger.info("%s KV codec profile: %s; prefill %.3f ms/token", self.worker_id,
                    [(o.label, round(o.size_ratio, 3), int(o.encode_bps / 1e6), int(o.decode_bps / 1e6))
                     for o in opts], self.policy.s_per_token * 1e3)

    async def kv_policy(self) -> dict[str, Any]:
        """What the adaptive controller believes (benchmarks, debugging)."""
        c = self.policy.controller
        return {"codec": self.policy.spec.codec, "prefill_s_per_token": self.policy.s_per_token,
                **self.policy.profile_status(),
                # bps is the estimate; samples, how many transfers it rests on (0: the default).
                "links": {} if c is None else {f"{a}->{b}": {"bps": e.bps, "samples": e.samples}
                                               for (a, b), e in c.links.items()},
                "options": [] if c is None else [
                    {"label": o.label, "size_ratio": o.size_ratio, "encode_bps": o.encode_bps,
                     "decode_bps": o.decode_bps} for o in c.options]}

    async def prefill(self, req: dict[str, Any]) -> dict[str, Any]:
        """req: request_id, prompt_token_ids, params (SamplingParams fields),
        decode_node_ip (where the KV goes: picks the transport) and optionally
        decode_actor (told to start pulling a streamed transfer at once).

        Returns first_token, kv (a KVHandle), queue_s, prefill_s, num_cached_tokens,
        first_logprobs and prompt_logprobs (None unless the params ask) and, for streamed
        transfers, kv_plan (codec per chunk)."""
        return await self._end_prefill(req["request_id"], self._begin_prefill(req))

    def _begin_prefill(self, req: dict[str, Any]) -> float:
        """prefill() up to the request queued for the engine; returns when it arrived."""
        rid = req["request_id"]
        received_at = time.monotonic()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[rid] = fut
        self._arrivals[rid] = received_at
        self._children[rid] = {cid for cid, _, _ in req.get("children") or ()}
        dest = req.get("decode_node_ip")
        self._dest[rid] = dest
        stream = self.settings.tp_size == 1 and self.connector.pick(dest) is self.connector.grpc
        try:
            if stream:
                layers, kvh, hd = self._kv_shape
                shape = (layers, 2, len(req["prompt_token_ids"]), kvh, hd)
                handle = self.connector.grpc.begin(rid, shape, self.manifest.model.dtype, dest,
                                                   self._arrivals[rid])
                self._streams[rid] = handle
                decode = req.get("decode_actor") or self._handles.get(req.get("decode_worker") or "")
                if decode is not None:
                    decode.prefetch_kv.remote(handle)
            self._submit(rid, {"prompt_token_ids": req["prompt_token_ids"], "params": req["params"],
                               "stream_kv": stream, "children": req.get("children")})
        except BaseException:
            self._forget(rid)
            raise
        return received_at

    async def _end_prefill(self, rid: str, received_at: float) -> dict[str, Any]:
        """prefill() from the request queued (_begin_prefill) to its result."""
        try:
            res = await asyncio.wait_for(self._futures[rid], timeout=self.manifest.server.request_timeout_s)
            # Monotonic clock (system-wide on a node): the ingress splits its dispatch time
            # into the call's way in, the KV publish and the reply's way back.
            return {**res, "received_at": received_at, "replied_at": time.monotonic()}
        except asyncio.TimeoutError:
            await self.abort(rid)
            raise TimeoutError(f"prefill of {rid} took longer than "
                               f"{self.manifest.server.request_timeout_s}s") from None
        finally:
            self._forget(rid)

    def _forget(self, rid: str) -> None:
        """A prefill call ended (or could not start): what this worker kept of it."""
        self._futures.pop(rid, None)
        self._arrivals.pop(rid, None)
        self._dest.pop(rid, None)
        self._children.pop(rid, None)
        if self._streams.pop(rid, None) is not None:  # not handed over: the receiver must not wait
            self.connector.grpc.sender.abort(rid, f"prefill of {rid} did not complete")

    def on_step(self, out: StepOutput) -> None:
        now = time.monotonic()
        for seq in out.finished:
            rid = seq.request_id
            fut = self._futures.get(rid)
            if fut is None or fut.done():
                # The prefill call already ended (aborted, timed out): an arena slot the KV
                # was gathered into goes back now, not at its TTL.
                if rid in out.exported_kv and self.connector.shm.arena is not None:
                    self.connector.shm.arena.discard(rid, reserved_only=True)
                continue
            arrival = self._arrivals.get(rid, now)
            first = seq.first_scheduled_time or now
            result = {"first_token": seq.output_token_ids[0], "queue_s": first - arrival,
                      "prefill_s": now - first, "num_cached_tokens": seq.num_cached_tokens,
                      "worker_id": self.worker_id, "node_ip": self._node_ip,
                      "first_logprobs": out.new_logprobs.get(rid),
                      "prompt_logprobs": out.prompt_logprobs.get(rid),
                      # Further choices (n > 1): (request id, first token, its logprobs).
                      "children": [(c.request_id, out.new_tokens[c.request_id],
                                    out.new_logprobs.get(c.request_id))
                                   for c in out.finished if c.request_id in self._children.get(rid, ())]}
            self.policy.observe_prefill(len(seq.prompt_token_ids) - seq.num_cached_tokens, now - first)
            handle = self._streams.pop(rid, None)
            if handle is not None:
                # Layers were handed to the sender as computed; the rest drains behind.
                result["kv_plan"] = self.connector.grpc.sender.stats(rid)
                self.connector.grpc.sender.end(rid)
                fut.set_result({**result, "kv": handle})
                continue
            kv = out.exported_kv.get(rid)
            if kv is None:
                fut.set_exception(RuntimeError(f"prefill of {rid} finished without its KV"))
                continue
            if rid == self._probe:
                fut.set_result({**result, "kv_tensor": kv})
                continue
            conn = self._early.pop(rid, None)
            if conn is not None:
                # The ingress needs the first token, not the KV: reply now, with a handle
                # without the ref (the ref goes to the decode worker once published), as
                # the KVHandle fields (kv_stub, cluster.dispatch.call_prefill): a tuple
                # pickles in a third of a dataclass's time on a cold cache (~50 us less
                # on the reply's way back, both ends; session 11).
                stub = (rid, tuple(kv.shape), str(kv.dtype).removeprefix("torch."), kv.numel() * kv.element_size(),
                        getattr(self.connector.pick(self._dest.get(rid)), "name", "object_store"))
                conn.send({"request_id": rid, "result": {
                    **result, "kv_stub": stub, "received_at": self._arrivals.get(rid, now), "replied_at": now}})
                # On the socket before the KV publish below starts a thread that competes
                # with this loop for the GIL; and the ingress, woken onto this CPU by the
                # write, runs before this turn goes on (channel.yield_cpu).
                conn.hand_off()
            # Publishing the KV (a copy into the object store, or encoding for gRPC) runs
            # off the event loop and off the engine thread, beside the next prefill step.
            send = asyncio.get_running_loop().run_in_executor(
                self._sender, self.connector.send, rid, kv, self._dest.get(rid))
            send.add_done_callback(lambda f, fut=fut, result=result: self._sent(fut, result, f))

    def _sent(self, fut: asyncio.Future[dict[str, Any]], result: dict[str, Any], send: asyncio.Future[Any]) -> None:
        if fut.done():  # the prefill call ended meanwhile (aborted, timed out): no one takes the KV
            if not send.cancelled() and send.exception() is None:
                self._drop_kv(send.result())
            return
        if send.exception() is not None:
            fut.set_exception(send.exception())  # type: ignore[arg-type]
        else:
            fut.set_result({**result, "kv": send.result()})

    async def inject_kv_fault(self, kind: str, count: int = 1) -> None:
        """Drills and tests: the next `count` gRPC KV streams from this worker are
        corrupted ("corrupt") or cut ("cut")."""
        if kind not in ("corrupt", "cut"):
            raise ValueError(f"unknown fault {kind!r}; allowed: corrupt, cut")
        self.connector.grpc._kv_server().fault = (kind, count)

    def on_request_error(self, request_id: str, error: Exception) -> None:
        fut = self._futures.get(request_id)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def on_aborted(self, request_id: str) -> None:
        fut = self._futures.get(request_id)
        if fut is not None and not fut.done():
            fut.cancel()
