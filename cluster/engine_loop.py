"""The engine thread of a worker (EngineWorker's mixin): requests and aborts queue up on
the event loop and are applied between steps; the engine steps back to back in its own
thread, so health checks, new requests and token streaming never wait for a step, and
the step never waits for them (results go back through call_soon_threadsafe)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from engine.engine import LLMEngine, StepOutput
from engine.sequence import SamplingParams
from engine.threads import use_threads

logger = logging.getLogger(__name__)


class WorkerDrainingError(RuntimeError):
    """The worker is draining and takes no new requests."""


class EngineLoopMixin:
    """Drain, abort and the step loop; the worker sets the attributes below."""

    worker_id: str
    engine: LLMEngine | Any | None
    threads: int
    _engine_scoped: bool
    _pending: deque[tuple[str, str, Any]]
    _work: threading.Event
    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None
    _engine_tid: int | None
    _stopping: bool
    _draining: bool
    _steps: int
    _tokens: int
    _busy_s: float
    _slow_steps: int
    _tpot_s: float
    _last_error: str | None

    async def drain(self, timeout_s: float = 60.0) -> bool:
        """Stop taking requests; return True once in-flight ones are done (False on timeout)."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.engine is None or (not self.engine.has_work and not self._pending):
                return True
            await asyncio.sleep(0.05)
        return False

    async def abort(self, request_id: str) -> None:
        self._pending.append(("abort", request_id, None))
        self._work.set()

    # -- the engine thread ------------------------------------------------------------
    # The engine runs in its own thread, steps back to back; the event loop only moves
    # requests in and results out (call_soon_threadsafe), so streaming tokens to callers
    # never delays the next step.
    def _submit(self, request_id: str, req: dict[str, Any]) -> None:
        if self._draining:
            raise WorkerDrainingError(f"{self.worker_id} is draining")
        if self.engine is None:
            raise RuntimeError(f"{self.worker_id} is not started")
        self._pending.append(("add", request_id, req))
        self._work.set()

    def _start_engine_thread(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine_thread, name=f"{self.worker_id}-engine",
                                        daemon=True)
        self._thread.start()

    def _apply_pending(self) -> None:
        assert self.engine is not None and self._loop is not None
        while self._pending:
            kind, rid, req = self._pending.popleft()
            if kind == "abort":
                if self.engine.abort(rid):
                    self._loop.call_soon_threadsafe(self.on_aborted, rid)
                continue
            try:
                children = [(cid, SamplingParams(**cp), outs) for cid, cp, outs in req.get("children") or ()]
                # reserved: the KV is already in blocks reserved for it (decode_workers.admission).
                self.engine.add_request(rid, req["prompt_token_ids"], SamplingParams(**req["params"]),
                                        output_token_ids=req.get("output_token_ids"),
                                        pending_kv=req.get("kv"), stream_kv=req.get("stream_kv", False),
                                        children=children, **({"reserved": True} if req.get("reserved") else {}))
            except Exception as e:  # noqa: BLE001 - handed to the request's waiter
                self._loop.call_soon_threadsafe(self.on_request_error, rid, e)

    def _engine_thread(self) -> None:
        assert self.engine is not None and self._loop is not None
        engine, loop = self.engine, self._loop
        self._engine_tid = threading.get_native_id()
        if self._engine_scoped:
            use_threads(self.threads)
        while not self._stopping:
            self._work.clear()
            self._apply_pending()
            if not engine.has_work:
                self._work.wait(timeout=1.0)
                continue
            t0 = time.perf_counter()
            try:
                out = engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the worker
                logger.exception("%s step failed", self.worker_id)
                self._last_error = f"{type(e).__name__}: {e}"
                for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                    engine.abort(seq.request_id, "error")
                    loop.call_soon_threadsafe(self.on_request_error, seq.request_id, e)
                continue
            dt = time.perf_counter() - t0
            self._busy_s += dt
            self._slow_steps += dt > self._tpot_s
            self._steps += 1
            self._tokens += out.num_tokens
            loop.call_soon_threadsafe(self.on_step, out)

    # -- hooks for subclasses -----------------------------------------------------------
    def on_step(self, out: StepOutput) -> None:
        raise NotImplementedError

    def on_request_error(self, request_id: str, error: Exception) -> None:
        raise NotImplementedError

    def on_aborted(self, request_id: str) -> None:
        pass
