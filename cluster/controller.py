"""The controller: a detached named actor that owns the pools.

It creates every worker the manifest asks for, health-checks them, replaces a worker
that died or stopped answering, and tells ingresses which workers exist (a versioned
snapshot). Shutting down kills every actor it started.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from cluster.manifest import Manifest

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "splitserve-controller"
HEALTH_TIMEOUT_S = 5.0
MISSES_BEFORE_REPLACE = 3


def worker_class(pool: str) -> type:
    if pool == "prefill":
        from prefill_workers.worker import PrefillWorker

        return PrefillWorker
    from decode_workers.worker import ColocatedWorker, DecodeWorker

    return ColocatedWorker if pool == "colocated" else DecodeWorker


@dataclass
class WorkerRecord:
    worker_id: str
    pool: str
    slot: int
    handle: Any
    node_ip: str | None = None
    healthy: bool = False
    misses: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)


def _node_ids_by_ip() -> dict[str, str]:
    return {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class Controller:
    def __init__(self, manifest_json: str) -> None:
        self.manifest = Manifest.model_validate_json(manifest_json)
        self.manifest_json = manifest_json
        self.workers: dict[str, WorkerRecord] = {}
        self.version = 0
        self.replacements = 0
        self._ids = itertools.count()
        self._health_task: asyncio.Task[None] | None = None
        self._replacing: set[tuple[str, int]] = set()
        self._stopping = False

    # -- creation ---------------------------------------------------------------------
    def _options(self, pool_name: str, slot: int) -> dict[str, Any]:
        pool = self.manifest.pools[pool_name]  # type: ignore[index]
        opts: dict[str, Any] = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus,
                                "max_restarts": 0, "max_concurrency": 1000}
        if pool.nodes:
            ip = pool.nodes[slot % len(pool.nodes)]
            node_id = _node_ids_by_ip().get(ip)
            if node_id is None:
                raise RuntimeError(f"pools.{pool_name}.nodes names {ip}, which is not an alive "
                                   f"Ray node; alive: {sorted(_node_ids_by_ip())}")
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return opts

    async def _create(self, pool_name: str, slot: int) -> WorkerRecord:
        worker_id = f"{pool_name}-{slot}-g{next(self._ids)}"
        cls = ray.remote(worker_class(pool_name))
        handle = cls.options(**self._options(pool_name, slot)).remote(
            worker_id, self.manifest_json, pool_name)
        rec = WorkerRecord(worker_id, pool_name, slot, handle)
        try:
            rec.stats = await asyncio.wait_for(handle.start.remote(), timeout=300)
            rec.node_ip = rec.stats.get("node_ip")
        except Exception:
            ray.kill(handle, no_restart=True)
            raise
        rec.healthy = True
        self.workers[worker_id] = rec
        self.version += 1
        logger.info("created %s on %s", worker_id, rec.node_ip)
        return rec

    async def start(self) -> dict[str, Any]:
        tasks = [self._create(name, slot) for name, pool in self.manifest.pools.items()
                 for slot in range(pool.replicas)]
        await asyncio.gather(*tasks)
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self.get_state()

    # -- health -----------------------------------------------------------------------
    async def _check(self, rec: WorkerRecord) -> None:
        try:
            rec.stats = await asyncio.wait_for(rec.handle.health.remote(), timeout=HEALTH_TIMEOUT_S)
            rec.misses = 0
            if not rec.healthy:
                rec.healthy = True
                self.version += 1
        except (asyncio.TimeoutError, ray.exceptions.GetTimeoutError):
            rec.misses += 1
            if rec.misses >= MISSES_BEFORE_REPLACE:
                await self._replace(rec, f"{rec.misses} health checks timed out")
        except ray.exceptions.RayError as e:
            await self._replace(rec, f"{type(e).__name__}")

    async def _replace(self, rec: WorkerRecord, why: str) -> None:
        key = (rec.pool, rec.slot)
        if self._stopping or key in self._replacing or rec.worker_id not in self.workers:
            return
        self._replacing.add(key)
        logger.warning("replacing %s: %s", rec.worker_id, why)
        self.workers.pop(rec.worker_id, None)
        self.version += 1
        try:
            ray.kill(rec.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        try:
            for attempt in range(5):
                try:
                    await self._create(rec.pool, rec.slot)
                    self.replacements += 1
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
            await asyncio.sleep(period)

    async def report_failure(self, worker_id: str) -> None:
        """An ingress saw this worker fail: check it now rather than at the next period."""
        rec = self.workers.get(worker_id)
        if rec is not None:
            await self._check(rec)

    # -- queries ----------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        pools: dict[str, list[dict[str, Any]]] = {name: [] for name in self.manifest.pools}
        for rec in self.workers.values():
            pools[rec.pool].append({"worker_id": rec.worker_id, "handle": rec.handle,
                                    "healthy": rec.healthy, "node_ip": rec.node_ip,
                                    "stats": rec.stats})
        return {"version": self.version, "pools": pools, "replacements": self.replacements}

    async def ping(self) -> bool:
        return True

    async def shutdown(self) -> int:
        """Kill every worker; returns how many."""
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        n = 0
        for rec in list(self.workers.values()):
            try:
                ray.kill(rec.handle, no_restart=True)
                n += 1
            except Exception:  # noqa: BLE001
                pass
        self.workers.clear()
        self.version += 1
        return n


def start_controller(manifest: Manifest, namespace_name: str | None = None) -> Any:
    """Create (or replace) the detached controller of this deployment; returns its handle."""
    name = f"{CONTROLLER_NAME}-{namespace_name or manifest.name}"
    try:
        old = ray.get_actor(name)
        ray.get(old.shutdown.remote(), timeout=30)
        ray.kill(old, no_restart=True)
    except ValueError:
        pass
    return ray.remote(Controller).options(name=name, lifetime="detached", num_cpus=0,
                                          max_concurrency=1000).remote(
        manifest.model_dump_json())
