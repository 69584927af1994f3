"""The controller's health loop: one health call in flight per worker, and a worker that
is dead or hung (not one that is only slow: cluster/liveness.py) replaced in its slot."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from cluster.liveness import HEALTH_TIMEOUT_S, Liveness
from cluster.records import WorkerRecord

logger = logging.getLogger("cluster.controller")


class HealthMixin:
    """Controller's health checks; the controller sets these in its __init__."""

    manifest: Any
    workers: dict[str, WorkerRecord]
    version: int
    replacements: int
    _published: int
    _stopping: bool
    _replacing: set[tuple[str, int]]

    async def _check(self, rec: WorkerRecord) -> None:
        """Ask the worker's health (one call in flight per worker; a late answer counts)
        and replace it if it is dead or hung, not if it is only slow (cluster/liveness.py)."""
        live = rec.liveness
        if live is None:
            live = rec.liveness = Liveness()
            live.observe(rec.stats)
        call = live.call
        if call is None:
            call = asyncio.ensure_future(self._health_call(rec.handle))
            call.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if unawaited
            live.sent(call, time.monotonic())
        await asyncio.wait({call}, timeout=HEALTH_TIMEOUT_S)
        if call.done():
            if live.call is not call:  # a concurrent check (report_failure) took this answer
                return
            live.call = None
            exc = None if call.cancelled() else call.exception()
            if isinstance(exc, ray.exceptions.RayError):
                await self._replace(rec, type(exc).__name__)
                return
            if exc is not None or call.cancelled():
                logger.warning("health check of %s failed: %r", rec.worker_id, exc)
                rec.misses += 1
                return
            rec.stats = call.result()
            live.answered(time.monotonic(), rec.stats)
            rec.misses = 0
            if not rec.healthy:
                rec.healthy = True
                self.version += 1
            return
        rec.misses += 1
        verdict, why = live.verdict(time.monotonic())
        if verdict in ("dead", "hung"):
            await self._replace(rec, why)
        elif verdict == "slow" and not live.slow_reported:
            live.slow_reported = True
            logger.warning("%s is slow, not replaced: %s", rec.worker_id, why)

    @staticmethod
    async def _health_call(handle: Any) -> dict[str, Any]:
        return await handle.health.remote()  # type: ignore[no-any-return]

    async def _replace(self, rec: WorkerRecord, why: str) -> None:
        key = (rec.pool, rec.slot)
        if rec.retiring:  # on its way out anyway: not replaced
            self._remove(rec, f"died while retiring ({why})")
            return
        if self._stopping or key in self._replacing or rec.worker_id not in self.workers:
            return
        self._replacing.add(key)
        if rec.liveness is not None and rec.liveness.call is not None:
            rec.liveness.call.cancel()
        logger.warning("replacing %s: %s", rec.worker_id, why)
        self.workers.pop(rec.worker_id, None)
        self.version += 1
        self._kill(rec)
        try:
            for attempt in range(5):
                try:
                    await self._create(rec.pool, rec.slot)
                    self.replacements += 1
                    await self._publish()
                    return
                except Exception as e:  # noqa: BLE001 - retried with backoff
                    logger.error("replacement of %s failed (%s); retrying", rec.worker_id, e)
                    await asyncio.sleep(min(2 ** attempt, 10))
        finally:
            self._replacing.discard(key)

    async def _health_loop(self) -> None:
        period = self.manifest.server.health_check_period_s
        while not self._stopping:
            await asyncio.gather(*(self._check(r) for r in list(self.workers.values())),
                                 return_exceptions=True)
            if self.version != self._published:
                await self._publish()
            await asyncio.sleep(period)

    @staticmethod
    def _kill(rec: WorkerRecord) -> None:
        """End a worker's actor (if still alive) and free its placement group."""
        try:
            ray.kill(rec.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        if rec.group is not None:
            rec.group.remove()
