"""One request's trip through the pools: prefill -> KV handle -> decode stream, or the
colocated worker alone. Turns tokens into text, applies stop strings, records metrics,
and turns worker failures into SplitServeErrors. Nothing here waits without a timeout."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import fields
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from cluster.admission import Headroom, TTFTModel
from cluster.channel_client import ChannelPool
from cluster.dispatch import call_prefill, release_kv, token_stream
from cluster.errors import InvalidRequestError, NoHealthyPoolError, SplitServeError, WorkerFailedError
from cluster.gen_admission import AdmissionMixin
from cluster.genrequest import Delta, GenRequest, StopStrings, Usage
from cluster.manifest import Manifest
from cluster.metrics import Metrics
from cluster.router import Router, WorkerView
from engine.errors import UnsupportedRequestError
from engine.scheduler import RequestTooLargeError
from engine.sequence import SamplingParams
from kvtransfer.connector import KVTransferError

logger = logging.getLogger(__name__)

_PARAM_FIELDS = tuple(f.name for f in fields(SamplingParams))


def after_this_turn(fn: Any) -> None:
    """Run fn once this event-loop turn is over: bookkeeping at a request's end (its KV
    release, metrics) then runs after the response this turn writes, not before it (it was
    ~0.1 ms of each single-token request's latency). At once without a running loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    loop.call_soon(fn)


def _params_dict(p: SamplingParams) -> dict[str, Any]:
    """dataclasses.asdict of sampling params for a worker, without its deep-copying
    recursion (~10x faster; the only containers are copied here)."""
    d = {k: getattr(p, k) for k in _PARAM_FIELDS}
    d["stop_token_ids"] = list(p.stop_token_ids)
    d["logit_bias"] = dict(p.logit_bias)
    return d

# Workers one request may be sent to per stage (prefill; decode) across worker faults, the
# first included; all within the request's deadline (server.request_timeout_s).
MAX_ATTEMPTS = 3
# Longest a re-sent request waits for a healthy worker of the pool (the controller is
# replacing the dead one), within its deadline.
WAIT_HEALTHY_S = 30.0


def _unwrap(e: BaseException) -> BaseException:
    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if cause is not None:
            return cause
    return e


def _retryable(e: SplitServeError) -> bool:
    """A worker died, timed out or its KV transfer failed: another worker may succeed."""
    return isinstance(e, WorkerFailedError) and e.code != "request_failed"


class Generator(AdmissionMixin):
    """Runs requests against the pools (one per ingress)."""

    def __init__(self, manifest: Manifest, router: Router, metrics: Metrics, tokenizer: Any,
                 controller: Any) -> None:
        self.m = manifest
        self.router = router
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.controller = controller
        self.eos = set(tokenizer.eos_token_ids)
        # Measured seconds per prompt token queued at a worker (its own and those ahead
        # of it) until the first token: the prefill rate under the current load.
        self.ttft_model = TTFTModel()  # TTFT vs prompt tokens queued ahead (cluster/admission.py)
        self.headroom = Headroom(manifest.slo.attainment)  # what the model does not see, learned
        # Prompt tokens of admitted requests not yet at a worker's queue (spread evenly).
        self.reserved = 0
        # Refused by admission since start (requests, prompt tokens): demand the autoscaler
        # counts (the ingress reports them to the controller).
        self.refused_requests = 0
        self.refused_prompt_tokens = 0
        self.first_pool = "prefill" if manifest.mode == "disaggregated" else "colocated"
        # One channel per worker (cluster.channel): prefill calls and token streams go over
        # it, not as Ray calls and a Ray object per streamed item. SPLITSERVE_CHANNEL=0
        # brings the Ray path back (benchmarks compare the two).
        self.channels: ChannelPool | None = None
        if os.environ.get("SPLITSERVE_CHANNEL", "1") != "0":
            self.channels = ChannelPool(f"ingress-{uuid.uuid4().hex[:12]}",
                                        lambda handle: handle.channel_info.remote())

    def _worker_failed(self, w: WorkerView, e: BaseException) -> WorkerFailedError:
        self.router.mark_failed(w.worker_id)
        try:
            self.controller.report_failure.remote(w.worker_id)
        except Exception:  # noqa: BLE001 - controller itself may be gone
            pass
        return WorkerFailedError(f"{w.pool} worker {w.worker_id} failed: {type(e).__name__}; "
                                 "it is being replaced, retry the request")

    def _map_error(self, w: WorkerView, e: BaseException) -> SplitServeError:
        e = _unwrap(e)
        if isinstance(e, RequestTooLargeError):
            return InvalidRequestError(str(e), param="max_tokens")
        if isinstance(e, UnsupportedRequestError):  # refused by the pool's engine (e.g. vLLM)
            return InvalidRequestError(str(e), param=e.param)
        if isinstance(e, KVTransferError):  # the link or the sender failed, not this worker
            return WorkerFailedError(f"KV transfer failed: {e}", code="kv_transfer_failed")
        if isinstance(e, SplitServeError):
            return e
        if isinstance(e, (RayActorError, asyncio.TimeoutError, TimeoutError, ConnectionError)):
            return self._worker_failed(w, e)
        logger.error("request failed on %s: %r", w.worker_id, e)
        # The worker's code failed on this request: another worker would fail the same way.
        return WorkerFailedError(f"{w.pool} worker {w.worker_id} failed: {type(e).__name__}: {e}",
                                 code="request_failed")

    def _first_stop(self, token: int, p: SamplingParams) -> str | None:
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        return "length" if p.max_tokens <= 1 else None

    async def _pick(self, pick: Any, deadline: float) -> WorkerView:
        """pick() a worker; while the pool has none healthy (a dead one being replaced),
        wait for the router's next view, up to WAIT_HEALTHY_S and the deadline."""
        until = min(deadline, time.monotonic() + WAIT_HEALTHY_S)
        while True:
            try:
                return pick()
            except NoHealthyPoolError:
                if time.monotonic() >= until:
                    raise
            await asyncio.sleep(0.1)

    async def _prefill(self, req: GenRequest, payload: dict[str, Any], first: WorkerView,
                       deadline: float) -> tuple[dict[str, Any], WorkerView]:
        """Prefill on `first`; nothing has been sent yet, so a worker fault re-sends the
        request to another prefill worker (bounded attempts, within the deadline)."""
        last: SplitServeError | None = None
        for attempt in range(MAX_ATTEMPTS):
            if attempt == 0:
                w = first
            else:
                if time.monotonic() >= deadline:
                    break
                w = await self._pick(self.router.pick_prefill, deadline)
                self.metrics.reroutes.labels("prefill").inc()
                logger.warning("re-sending %s to prefill worker %s (attempt %d): %s", req.request_id,
                               w.worker_id, attempt + 1, last.message if last else "")
            load = len(req.prompt_token_ids)
            self.router.begin(w, load)
            q = self._queue(w, load, req)
            ok = False
            try:
                left = max(0.1, deadline - time.monotonic())
                called_at = time.monotonic()
                res = await self._call_prefill(w, payload, left)
                res["called_at"] = called_at
                ok = True
                return res, w
            except Exception as e:  # noqa: BLE001 - mapped below
                last = self._map_error(w, e)
                if not _retryable(last):
                    raise last from None
            finally:
                self._dequeue(q, ok)
                self.router.end(w, load)
        assert last is not None
        raise last

    async def _call_prefill(self, w: WorkerView, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        return await call_prefill(self.channels, w, payload, timeout_s)

    def _stream(self, w: WorkerView, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return token_stream(self.channels, w, payload, self.m.server.token_timeout_s)

    @staticmethod
    def _resume_payload(req: GenRequest, ids: list[str], all_params: list[SamplingParams],
                        sent: list[list[int]], open_ids: set[str], prompt_lps_sent: bool,
                        suffix: str) -> dict[str, Any]:
        """A request for a decode worker to continue the open choices from the prompt and
        their tokens so far (no KV: it computes them). The choice with the fewest tokens
        leads (a forked choice without tokens samples from the lead's prompt logits)."""
        going = sorted((j for j, rid in enumerate(ids) if rid in open_ids), key=lambda j: (len(sent[j]), j))

        def params(j: int) -> dict[str, Any]:
            d = _params_dict(all_params[j])
            if prompt_lps_sent:
                d["prompt_logprobs"] = None
            return d

        lead = going[0]
        return {"request_id": ids[lead] + suffix, "prompt_token_ids": req.prompt_token_ids,
                "params": params(lead), "output_token_ids": list(sent[lead]) or None,
                "children": [(ids[j] + suffix, params(j), list(sent[j]) or None) for j in going[1:]]}

    async def generate(self, req: GenRequest, usage: Usage) -> AsyncIterator[Delta]:
        """Yields text deltas of the request's choices (Delta.index); each choice's last
        has finish_reason. Raises SplitServeError; an error before the first yield means
        nothing reached the client. The choices share one prefill of the prompt."""
        t0 = time.monotonic()
        usage.prompt_tokens = len(req.prompt_token_ids)
        all_params = [req.params] + list(req.more)
        ids = [req.request_id] + [f"{req.request_id}-{j}" for j in range(1, len(all_params))]
        index_of = {rid: j for j, rid in enumerate(ids)}
        p = req.params
        base = {"request_id": req.request_id, "prompt_token_ids": req.prompt_token_ids,
                "params": _params_dict(p),
                "children": [(ids[j], _params_dict(all_params[j]), None) for j in range(1, len(ids))]}
        detoks = [self.tokenizer.incremental_detokenizer() for _ in ids]
        stops = [StopStrings(req.stop) for _ in ids]
        counts = [0] * len(ids)
        ttft: float | None = None
        n_out = 0
        last_token_at: list[float | None] = [None] * len(ids)  # per choice

        def emit(j: int, tokens: list[int], reason: str | None, lps: list[Any] | None = None,
                 prompt_lps: list[Any] | None = None) -> Delta:
            nonlocal n_out
            if tokens:
                now = time.monotonic()
                if last_token_at[j] is not None:
                    self.metrics.token_gap(now - last_token_at[j], len(tokens))
                last_token_at[j] = now
            n_out += len(tokens)
            counts[j] += len(tokens)
            usage.completion_tokens = n_out
            new = detoks[j].push(tokens) + (detoks[j].flush() if reason is not None else "")
            text, hit = stops[j].feed(new, final=reason is not None,
                                      active=counts[j] >= all_params[j].min_tokens)
            return Delta(text, tokens, "stop" if hit else reason, lps, prompt_lps, j)

        self.metrics.inflight.inc()
        outcome = "error"
        holding: list[WorkerView] = []  # released when the request ends, however it ends
        deadline = t0 + self.m.server.request_timeout_s
        # Tokens of each choice so far: a decode worker that fails resumes from them.
        sent: list[list[int]] = [[] for _ in ids]
        prompt_lps_sent = False
        handle = None
        kv_from: WorkerView | None = None
        prefill_times: tuple[float, float] | None = None  # (queue_s, prefill_s), observed at the end
        try:
            if self.m.mode == "disaggregated":
                # Both workers are chosen up front: the prefill worker picks the KV
                # transport from where the decode worker is.
                usage.dispatched_at = time.monotonic()
                pw = await self._pick(self.router.pick_prefill, deadline)
                w = await self._pick(lambda: self.router.pick_decode(self.m.decode_pool, near=pw.node_ip),
                                     deadline)
                # Held (for draining: autoscaling, apply) from pick to finish; a worker a
                # fault re-routes to is not held, and a retiring one it lands on is re-routed
                # from again.
                self.router.hold(pw)
                self.router.hold(w)
                holding += [pw, w]
                res, kv_from = await self._prefill(req, {**base, "decode_node_ip": w.node_ip,
                                                "decode_worker": w.worker_id, "decode_actor": w.handle},
                                                   pw, deadline)
                # Held from here: released at the end however the request ends (even at its
                # first token, or when the client leaves during the first yield).
                handle = res["kv"]
                usage.first_token_at = time.monotonic()
                ttft = usage.first_token_at - t0
                usage.worker_s = res["queue_s"] + res["prefill_s"]
                if "received_at" in res:
                    usage.rpc_in_s = res["received_at"] - res["called_at"]
                    usage.publish_s = res["replied_at"] - res["received_at"] - usage.worker_s
                    usage.rpc_out_s = usage.first_token_at - res["replied_at"]
                # Histograms at the request's end (ended, below): not between the first token
                # and its response.
                prefill_times = (res["queue_s"], res["prefill_s"])
                firsts = {req.request_id: (res["first_token"], res.get("first_logprobs"))}
                firsts.update({cid: (t, lp) for cid, t, lp in res.get("children") or ()})
                going: list[int] = []  # choices the decode worker continues
                for j, rid in enumerate(ids):
                    tok, lp = firsts[rid]
                    sent[j].append(tok)
                    d = emit(j, [tok], self._first_stop(tok, all_params[j]), None if lp is None else [lp],
                             res.get("prompt_logprobs"))
                    prompt_lps_sent = True
                    yield d
                    if d.finish_reason is None:
                        going.append(j)
                if not going:
                    outcome = "ok"
                    return
                # Prompt logprobs come from where the prompt is computed: not again here.
                # The first choice still going holds the KV; the others fork it.
                lead = going[0]
                payload = {"request_id": ids[lead], "prompt_token_ids": req.prompt_token_ids,
                           "params": {**_params_dict(all_params[lead]), "prompt_logprobs": None},
                           "output_token_ids": [firsts[ids[lead]][0]], "kv": handle,
                           "children": [(ids[j], {**_params_dict(all_params[j]), "prompt_logprobs": None},
                                         [firsts[ids[j]][0]]) for j in going[1:]]}
                open_ids = {ids[j] for j in going}
                pool = self.m.decode_pool
            else:
                payload = base
                pool = "colocated"
                w = await self._pick(lambda: self.router.pick_decode("colocated"), deadline)
                self.router.hold(w)
                holding.append(w)
                open_ids = set(ids)
            err: SplitServeError | None = None  # the last attempt's failure
            for attempt in range(MAX_ATTEMPTS):
                if attempt > 0:
                    # The decode (colocated) worker failed: resume the open choices on
                    # another one from the prompt and the tokens so far, which it computes
                    # (no KV), so greedy choices continue exactly as they would have.
                    assert err is not None
                    if time.monotonic() >= deadline:
                        raise err
                    w = await self._pick(lambda: self.router.pick_decode(pool), deadline)
                    self.metrics.reroutes.labels("decode").inc()
                    logger.warning("resuming %s on %s worker %s from %d tokens (attempt %d): %s",
                                   req.request_id, pool, w.worker_id, sum(len(t) for t in sent),
                                   attempt + 1, err.message)
                    # Fresh ids on the worker: a late abort of an earlier attempt (the same
                    # worker may serve again after a KV transfer failure) cannot hit this one.
                    suffix = f"~{attempt}"
                    index_of.update({rid + suffix: j for j, rid in enumerate(ids)})
                    payload = self._resume_payload(req, ids, all_params, sent, open_ids,
                                                   prompt_lps_sent, suffix)
                err = None
                load = self.router.blocks_for(len(req.prompt_token_ids) + p.max_tokens) * len(open_ids)
                self.router.begin(w, load)
                # Colocated: the prompt is computed here, it queues until the first token.
                q = self._queue(w, len(req.prompt_token_ids), req) if pool == "colocated" else None
                stream = self._stream(w, payload)
                try:
                    async for msg in stream:
                        if q is not None:
                            self._dequeue(q, True)
                            q = None
                        if ttft is None:
                            ttft = time.monotonic() - t0
                        if "kv_receive_s" in msg and payload.get("kv") is not None:
                            self.metrics.kv_bytes.inc(msg.get("kv_bytes", handle.nbytes))
                            itemsize = 4 if handle.dtype == "float32" else 2
                            self.metrics.kv_raw_bytes.inc(math.prod(handle.shape) * itemsize)
                            self.metrics.kv_transfers.labels(handle.transport).inc()
                            for choice in msg.get("kv_choices") or ():
                                self.metrics.kv_chunks.labels(choice).inc()
                            self.metrics.kv_refetches.inc(max(0, msg.get("kv_attempts", 1) - 1))
                            self.metrics.kv_seconds.inc(handle.send_s + msg["kv_receive_s"])
                        rid = msg.get("request_id", req.request_id)
                        j = index_of[rid]
                        sent[j].extend(msg["token_ids"])
                        d = emit(j, msg["token_ids"], msg["finish_reason"], msg.get("logprobs"),
                                 msg.get("prompt_logprobs"))
                        if d.prompt_logprobs is not None:
                            prompt_lps_sent = True
                        if d.text or d.token_ids or d.finish_reason or d.prompt_logprobs is not None:
                            yield d
                        if d.finish_reason is not None:
                            open_ids.discard(ids[j])
                            if not open_ids:
                                outcome = "ok"
                                return
                    err = WorkerFailedError(f"decode stream of {req.request_id} ended without finishing")
                except WorkerFailedError as e:
                    err = e
                except SplitServeError:
                    raise
                except Exception as e:  # noqa: BLE001 - worker death, timeout, KV transfer
                    err = self._map_error(w, e)
                    if not _retryable(err):
                        raise err from None
                finally:
                    self._dequeue(q, False)
                    await stream.aclose()
                    self.router.end(w, load)
            assert err is not None
            raise err
        finally:
            for held in holding:
                self.router.unhold(held)
            self._unreserve(req)
            e2e = time.monotonic() - t0
            release = (kv_from if handle is not None and handle.transport in ("grpc", "shm") and kv_from is not None
                       else None)

            def ended() -> None:
                if release is not None:
                    # However the request ended, the sender need not keep its KV parts or
                    # arena slot (the receiver releases them after a successful fetch; this
                    # covers the rest).
                    try:
                        release_kv(self.channels, release, handle.request_id)
                    except Exception:  # noqa: BLE001 - the sender may be dead (its parts with it)
                        pass
                if prefill_times is not None:
                    self.metrics.queue.observe(prefill_times[0])
                    self.metrics.prefill.observe(prefill_times[1])
                self.metrics.inflight.dec()
                self.metrics.requests.labels(outcome).inc()
                if outcome == "ok":
                    self.metrics.e2e.observe(e2e)
                    self.metrics.tokens.inc(n_out)
                    self.metrics.request_done(ttft, e2e, len(req.prompt_token_ids), n_out)
                    if ttft is not None:
                        self.metrics.ttft.observe(ttft)
                        if n_out > len(ids):
                            self.metrics.tpot.observe((e2e - ttft) / (n_out / len(ids) - 1))

            after_this_turn(ended)
