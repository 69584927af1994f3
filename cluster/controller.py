"""The controller: a detached named actor that owns the pools.

It creates every worker the manifest asks for, health-checks them, replaces a worker
that died or stopped answering, and tells ingresses which workers exist (a versioned
snapshot). Shutting down kills every actor it started. Autoscaling
(cluster/controller_autoscale.py) and the live rollout of a changed manifest
(cluster/controller_rollout.py) are mixins of the same actor class. Ray restarts it when
its process dies; the restarted one re-adopts the live workers (cluster/revival.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any

import ray

from cluster.controller_autoscale import AutoscaleMixin
from cluster.controller_health import HealthMixin
from cluster.controller_rollout import RolloutMixin
from cluster.liveness import HEALTH_TIMEOUT_S
from cluster.manifest import Manifest
from cluster.records import WorkerRecord
from cluster.revival import RevivingError, adopt, group_name_prefix, remove_leftovers, worker_actor_name
from kvtransfer.base import KV_TOKEN_ENV as TOKEN_ENV

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "splitserve-controller"
# An ingress that has not asked for the state this long is gone (its holds no longer count).
REPORT_STALE_S = 10.0
# How long a worker's placement group may take to be placed (hardware.placement_timeout_s).
PLACEMENT_TIMEOUT_S = 60.0


def worker_class(pool: str) -> type:
    if pool == "prefill":
        from prefill_workers.worker import PrefillWorker

        return PrefillWorker
    if pool in ("attention", "expert"):
        from decode_workers.afd import AttentionWorker, ExpertWorker

        return AttentionWorker if pool == "attention" else ExpertWorker
    from decode_workers.worker import ColocatedWorker, DecodeWorker

    return ColocatedWorker if pool == "colocated" else DecodeWorker


class Controller(HealthMixin, AutoscaleMixin, RolloutMixin):
    def __init__(self, manifest_json: str, kv_token: str | None = None, deployment: str | None = None) -> None:
        self.manifest = Manifest.model_validate_json(manifest_json)
        self.manifest_json = manifest_json
        self.workers: dict[str, WorkerRecord] = {}
        self.version = 0
        self.replacements = 0
        self._ids = itertools.count()
        self._health_task: asyncio.Task[None] | None = None
        self._replacing: set[tuple[str, int]] = set()
        self._stopping = False
        self._published = -1
        # Autoscaling (cluster/autoscale.py): per pool the policy's memory, the previous
        # stats sample, and what the ingresses export (decisions by action, unfulfilled
        # scale-ups, the last reason).
        self._policy: dict[str, Any] = {}
        self._samples: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}
        self.autoscale: dict[str, dict[str, Any]] = {}
        self._autoscale_tasks: list[asyncio.Task[None]] = []
        # Per ingress: (requests, prompt tokens) its admission refused since it started.
        self.refused_reports: dict[str, tuple[int, int]] = {}
        self._refused_seen: dict[str, dict[str, tuple[int, int]]] = {}
        self._modelled: dict[str, float | None] = {}
        self._retire_tasks: set[asyncio.Task[None]] = set()
        # Ingresses' reports: id -> (monotonic time, state version they routed on, worker id
        # -> requests they hold on it). A retiring worker goes once none holds one.
        self._reports: dict[str, tuple[float, int, dict[str, int]]] = {}
        # Sizing and rollouts change pools one at a time.
        self._lock = asyncio.Lock()
        # Bumped by each applied manifest; ingresses fetch the new one when it changes.
        self.manifest_version = 0
        # Secret of this deployment: KV servers answer only workers that present it
        # (passed in, so that a restarted controller hands out the same one).
        self.kv_token = kv_token or secrets.token_urlsafe(32)
        # Names this deployment's detached workers and placement groups (cluster/revival.py).
        self.deployment = deployment or self.manifest.name
        # Restarted by Ray after its process died: re-adopt the workers on the first call.
        ctx = ray.get_runtime_context()
        # Built outside an actor (unit tests of its logic): nothing to re-adopt.
        self._revived = ctx.get_actor_id() is not None and bool(ctx.was_current_actor_reconstructed)
        self._adoption: asyncio.Task[int] | None = None
        if self._revived:
            self.version = int(time.time())  # above any version of the previous life

    # -- creation ---------------------------------------------------------------------
    async def _group(self, pool_name: str, slot: int, worker_id: str) -> Any:
        """The worker's placement group: one bundle per TP rank, STRICT_PACK on the node
        the manifest names for this slot (any one node when it names none)."""
        from placement.groups import create_worker_group

        pool = self.manifest.pools[pool_name]  # type: ignore[index]
        ip = pool.nodes[slot % len(pool.nodes)] if pool.nodes else None
        hw = self.manifest.hardware
        timeout = hw.placement_timeout_s if hw is not None else PLACEMENT_TIMEOUT_S
        return await create_worker_group(pool_name, worker_id, pool.tp, pool.num_cpus, pool.num_gpus, ip,
                                         timeout, name_prefix=group_name_prefix(self.deployment, worker_id))

    def _options(self, pool_name: str, group: Any, worker_id: str) -> dict[str, Any]:
        pool = self.manifest.pools[pool_name]  # type: ignore[index]
        # The deployment's KV token reaches every worker (and its TP ranks' processes
        # inherit nothing: only rank 0 serves KV) through its environment.
        env = {TOKEN_ENV: self.kv_token}
        kt = self.manifest.kv_transfer
        if kt.tls_cert_file and kt.tls_key_file:
            env.update({"SPLITSERVE_KV_TLS_CERT": kt.tls_cert_file, "SPLITSERVE_KV_TLS_KEY": kt.tls_key_file})
        # Detached and named: a worker outlives a controller process that dies, and the
        # restarted controller finds it by name (cluster/revival.py).
        return {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "max_restarts": 0,
                "lifetime": "detached", "name": worker_actor_name(self.deployment, worker_id),
                "max_concurrency": 1000, "scheduling_strategy": group.strategy(0),
                "runtime_env": {"env_vars": env}}

    def _free_slot(self, pool_name: str) -> int:
        used = {r.slot for r in self.workers.values() if r.pool == pool_name}
        return next(i for i in itertools.count() if i not in used)

    async def _create(self, pool_name: str, slot: int) -> WorkerRecord:
        worker_id = f"{pool_name}-{slot}-g{next(self._ids)}"
        group = await self._group(pool_name, slot, worker_id)
        try:
            cls = ray.remote(worker_class(pool_name))
            handle = cls.options(**self._options(pool_name, group, worker_id)).remote(
                worker_id, self.manifest_json, pool_name)
        except Exception:
            group.remove()
            raise
        rec = WorkerRecord(worker_id, pool_name, slot, handle, group=group)
        try:
            rec.stats = await asyncio.wait_for(handle.start.remote(), timeout=300)
            rec.node_ip = rec.stats.get("node_ip")
        except Exception:
            ray.kill(handle, no_restart=True)
            group.remove()
            raise
        rec.healthy = True
        self.workers[worker_id] = rec
        self.version += 1
        logger.info("created %s on %s", worker_id, rec.node_ip)
        return rec

    async def start(self) -> dict[str, Any]:
        tasks = [self._create(name, slot) for name, pool in self.manifest.pools.items()
                 for slot in range(pool.replicas)]
        # Every creation runs to its end (placed or failed) before a failure is raised, so
        # that shutdown() then finds every worker and placement group to remove.
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await self._publish()
        self._start_loops()
        return self.get_state()

    def _start_loops(self) -> None:
        loop = asyncio.get_running_loop()
        self._health_task = loop.create_task(self._health_loop())
        for name, pool in self.manifest.pools.items():
            if pool.autoscaling is not None:
                self._autoscale_tasks.append(loop.create_task(self._autoscale_loop(name), name=f"autoscale-{name}"))

    def bump_ids(self, start: int) -> None:
        """New worker ids start at generation `start` (after adopted ones)."""
        self._ids = itertools.count(start)

    def _reviving(self) -> bool:
        """After a restart: start re-adopting the workers (once); True until done."""
        if not self._revived or self._stopping:
            return False
        if self._adoption is None:
            self._adoption = asyncio.get_running_loop().create_task(self._adopt())
        return not self._adoption.done()

    async def _adopt(self) -> int:
        try:
            n = await adopt(self)
        except Exception:
            logger.exception("re-adopting workers failed; starting over with new ones")
            n = 0
        self.version += 1
        # Loops first: _publish runs inside this (adoption) task, and once raised here
        # (get_state's RevivingError) the revived controller was left without health checks:
        # its adopted workers' stats stayed as adoption found them (mid-load: an arena slot
        # or KV blocks "held" forever), and only ingresses' failure reports replaced workers.
        self._start_loops()
        await self._publish()
        return n

    async def _publish(self) -> None:
        """Send every worker the current snapshot (workers that reach other pools' workers
        directly, like attention workers their expert workers, take their addresses from it)."""
        version = self.version
        state = self._state_snapshot()  # not get_state: it refuses while the adoption (maybe this caller) runs
        calls = []
        for rec in list(self.workers.values()):
            method = getattr(rec.handle, "cluster_state", None)
            if method is not None:
                calls.append(asyncio.wait_for(method.remote(state), timeout=HEALTH_TIMEOUT_S))
        await asyncio.gather(*calls, return_exceptions=True)
        self._published = version

    async def report_failure(self, worker_id: str) -> None:
        """An ingress saw this worker fail: check it now rather than at the next period."""
        if self._reviving():
            return
        rec = self.workers.get(worker_id)
        if rec is not None:
            await self._check(rec)

    # -- scaling ------------------------------------------------------------------------
    def live(self, pool: str) -> list[WorkerRecord]:
        return [r for r in self.workers.values() if r.pool == pool and not r.retiring]

    def _remove(self, rec: WorkerRecord, why: str) -> None:
        if self.workers.pop(rec.worker_id, None) is None:
            return
        self.version += 1
        self._kill(rec)
        logger.info("removed %s: %s", rec.worker_id, why)

    def _held(self, worker_id: str, since_version: int) -> int | None:
        """Requests ingresses hold on the worker; None while some live ingress has not yet
        routed on a snapshot at least since_version (it may still pick the worker)."""
        now, n = time.monotonic(), 0
        for rid, (at, version, held) in list(self._reports.items()):
            if now - at > REPORT_STALE_S:
                del self._reports[rid]
                continue
            if version < since_version:
                return None
            n += held.get(worker_id, 0)
        return n

    async def retire(self, worker_id: str, why: str, timeout_s: float | None = None) -> bool:
        """Drain a worker, then remove it: ingresses stop routing to it (its snapshot says
        draining), requests they already hold on it finish (prefill workers keep their KV
        until the decode worker took it), then the worker stops taking requests and is
        killed, which frees its KV. Returns False when the drain timed out (removed anyway)."""
        rec = self.workers.get(worker_id)
        if rec is None or rec.retiring:
            return False
        rec.retiring = True
        self.version += 1
        since = self.version
        await self._publish()
        logger.info("draining %s: %s", worker_id, why)
        timeout = timeout_s if timeout_s is not None else self.manifest.server.request_timeout_s + 30
        deadline = time.monotonic() + timeout
        drained = False
        while time.monotonic() < deadline and worker_id in self.workers:
            held = self._held(worker_id, since)
            s = rec.stats
            if held == 0 and not s.get("running") and not s.get("waiting") and not s.get("kv_in_flight"):
                left = max(1.0, deadline - time.monotonic())
                try:
                    drained = bool(await asyncio.wait_for(rec.handle.drain.remote(left), timeout=left + 5))
                except Exception as e:  # noqa: BLE001 - dead or stuck: removed below
                    logger.warning("drain of %s failed: %s", worker_id, e)
                break
            await asyncio.sleep(0.2)
        if not drained:
            logger.warning("%s did not drain within %.0f s; removing it anyway", worker_id, timeout)
        self._remove(rec, why)
        await self._publish()
        return drained

    # -- attention/expert disaggregation ------------------------------------------------
    async def apply_expert_placement(self, layers: list[list[list[int]]], timeout_s: float = 300.0) -> dict[str, Any]:
        """Live re-placement of the experts (pools attention + expert): every expert worker
        first loads the experts the new placement gives it (keeping its old ones), then
        every attention worker switches its routing between two steps, then the expert
        workers drop what they no longer hold. No request fails for it. The manifest the
        controller hands to new workers carries the placement inline, so a replaced expert
        worker loads its new experts."""
        from cluster.errors import ManifestError
        from cluster.manifest_checks import afd_problems
        from engine.experts import shard_experts

        if not self.manifest.afd:
            raise ManifestError([("pools", "no attention/expert pools in this deployment")])
        candidate = self.manifest.model_copy(deep=True)
        candidate.pools["expert"].placement = layers  # type: ignore[index]
        problems = afd_problems(candidate)
        if problems:
            raise ManifestError(problems)
        experts = sorted((r for r in self.workers.values() if r.pool == "expert"), key=lambda r: r.slot)
        attention = [r for r in self.workers.values() if r.pool == "attention"]

        async def each(recs: list[WorkerRecord], call: Any) -> list[Any]:
            return list(await asyncio.wait_for(asyncio.gather(*(call(r) for r in recs)), timeout=timeout_s))

        self.manifest = candidate
        self.manifest_json = candidate.model_dump_json()
        loaded = await each(experts, lambda r: r.handle.load_experts.remote(shard_experts(layers, r.slot)))
        await each(attention, lambda r: r.handle.set_placement.remote(layers))
        dropped = await each(experts, lambda r: r.handle.drop_experts.remote(shard_experts(layers, r.slot)))
        self.version += 1
        logger.info("expert placement applied: %d expert copies loaded, %d dropped", sum(loaded), sum(dropped))
        return {"loaded": sum(loaded), "dropped": sum(dropped), "expert_workers": len(experts),
                "attention_workers": len(attention)}

    # -- queries ----------------------------------------------------------------------
    def get_state(self, reporter: str | None = None, version: int | None = None,
                  held: dict[str, int] | None = None, refused: tuple[int, int] | None = None) -> dict[str, Any]:
        """The versioned snapshot of every pool. An ingress passes its id, the version it
        routes on, the requests it holds per worker (so retiring workers are drained) and
        the requests and prompt tokens its TTFT admission refused since it started (demand
        for the autoscaler). A restarted controller raises RevivingError until it has
        re-adopted its workers."""
        if self._reviving():
            raise RevivingError("the controller was restarted and is re-adopting its workers; retry shortly")
        if reporter is not None:
            self._reports[reporter] = (time.monotonic(), -1 if version is None else version, dict(held or {}))
            if refused is not None:
                self.refused_reports[reporter] = (int(refused[0]), int(refused[1]))
        return self._state_snapshot()

    def _state_snapshot(self) -> dict[str, Any]:
        pools: dict[str, list[dict[str, Any]]] = {name: [] for name in self.manifest.pools}
        for rec in self.workers.values():
            stats = {**rec.stats, "draining": True} if rec.retiring else rec.stats
            pools.setdefault(rec.pool, []).append({"worker_id": rec.worker_id, "handle": rec.handle,
                                    "healthy": rec.healthy, "node_ip": rec.node_ip,
                                    # Health answers' times (s) and the longest silence.
                                    "health_rtt_s": list(rec.liveness.rtts) if rec.liveness else [],
                                    "health_silence_s": rec.liveness.longest_silence_s if rec.liveness else 0.0,
                                    "health_late_s": rec.liveness.longest_late_s if rec.liveness else 0.0,
                                    # Health answers this controller got from it (its stats' freshness).
                                    "health_checks": rec.liveness.answers if rec.liveness else 0,
                                    "stats": stats,
                                    "placement_group": rec.group.id_hex if rec.group is not None else None,
                                    "planned_node": rec.group.node_ip if rec.group is not None else None})
        return {"version": self.version, "pools": pools, "replacements": self.replacements,
                "manifest_version": self.manifest_version,
                "autoscale": {p: {**a, "decisions": dict(a["decisions"])} for p, a in self.autoscale.items()}}

    async def ping(self) -> bool:
        self._reviving()
        return True

    async def shutdown(self) -> int:
        """Kill every worker; returns how many."""
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
        for task in [*self._autoscale_tasks, *self._retire_tasks]:
            task.cancel()
        n = 0
        for rec in list(self.workers.values()):
            try:
                ray.kill(rec.handle, no_restart=True)
                n += 1
            except Exception:  # noqa: BLE001
                pass
            if rec.group is not None:
                rec.group.remove()
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
    # Workers of an earlier life of this deployment that no controller owns any more.
    remove_leftovers(namespace_name or manifest.name)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the node that deploys, where the ingress runs, so that losing a worker node loses
    # workers, which the controller replaces, not the controller itself. Not soft: Ray's
    # soft affinity may spill even a zero-CPU actor to another node (seen in CI, where the
    # controller landed on a worker node and died with it); the deploying node is alive.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # Restarted by Ray when its process dies, with the same arguments (manifest, KV token):
    # it re-adopts the live workers (cluster/revival.py).
    return ray.remote(Controller).options(name=name, lifetime="detached", num_cpus=0, max_restarts=-1,
                                          max_concurrency=1000, scheduling_strategy=here).remote(
        manifest.model_dump_json(), secrets.token_urlsafe(32), namespace_name or manifest.name)
