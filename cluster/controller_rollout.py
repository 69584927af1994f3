"""The controller's live rollout of a changed manifest (`splitserve apply`, issue 15): the pure
plan comes from cluster/rollout.py; this carries it out with the controller's workers. A
mixin of cluster.controller.Controller."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster.manifest import Manifest

logger = logging.getLogger("cluster.controller")


class RolloutMixin:
    # Provided by Controller.
    manifest: Any
    manifest_json: str
    manifest_version: int
    version: int
    _samples: dict[str, Any]
    _lock: asyncio.Lock

    # -- live manifest changes ------------------------------------------------------------
    def get_manifest(self) -> str:
        return self.manifest_json

    async def apply(self, manifest_json: str, drain_timeout_s: float | None = None) -> dict[str, Any]:
        """Roll out a changed manifest (splitserve apply): pools whose worker settings
        changed (SLO, codec, batch or KV sizes, ...) get new workers, one at a time, each
        old worker drained (no request fails) after its successor started; resized pools
        grow or drain; ingresses take the new manifest. Fields that need a restart refuse
        the whole manifest: {"ok": False, "problems": [[field, reason], ...]}. A new worker
        that fails to start midway rolls the deployment back to the previous manifest
        (_roll_back): {"ok": False, "rolled_back": True, "problems": [[pool, what failed]]}."""
        from cluster.rollout import plan_rollout

        new = Manifest.model_validate_json(manifest_json)
        async with self._lock:
            plan = plan_rollout(self.manifest, new, {p: len(self.live(p)) for p in self.manifest.pools})
            if not plan.ok:
                return {"ok": False, "problems": [list(x) for x in plan.restart], "changed": plan.changed}
            experts = None
            if plan.placement:  # re-placed live, before any pool rolls
                from cluster.manifest_checks import afd_problems, read_expert_placement

                bad = afd_problems(new)
                if bad:
                    return {"ok": False, "problems": [list(x) for x in bad], "changed": plan.changed}
                experts = await self.apply_expert_placement(read_expert_placement(new))
                new.pools["expert"].placement = self.manifest.pools["expert"].placement  # type: ignore[index]
            old, old_json = self.manifest, self.manifest_json
            before = {p: len(self.live(p)) for p in old.pools}
            self.manifest = new
            self.manifest_json = new.model_dump_json()
            self.manifest_version += 1
            self.version += 1
            await self._publish()
            logger.info("applying manifest %d: changed %s; rolling %s; resizing %s", self.manifest_version,
                        plan.changed, plan.roll, plan.resize)
            started: list[str] = []
            retired: list[str] = []
            for pool in self.manifest.pools:
                try:
                    if pool not in plan.roll and pool not in plan.resize:
                        continue
                    olds = sorted(self.live(pool), key=lambda r: r.slot) if pool in plan.roll else []
                    have = len(self.live(pool))
                    target = plan.resize.get(pool, have)
                    # Rolled: a new worker, then an old one drained, one at a time.
                    for i in range(max(len(olds), target - (have - len(olds)))):
                        if len(self.live(pool)) - (len(olds) - i) < target:
                            rec = await self._create(pool, self._free_slot(pool))
                            started.append(rec.worker_id)
                            await self._publish()
                        if i < len(olds):
                            await self.retire(olds[i].worker_id, f"rollout of manifest {self.manifest_version}",
                                              drain_timeout_s)
                            retired.append(olds[i].worker_id)
                    # Resized only, or the rollout left more than the target.
                    extra = sorted(self.live(pool), key=lambda r: -r.slot)[:max(0, len(self.live(pool)) - target)]
                    for rec in extra:
                        await self.retire(rec.worker_id, f"manifest {self.manifest_version}: {target} replicas",
                                          drain_timeout_s)
                        retired.append(rec.worker_id)
                    self._samples.pop(pool, None)
                except Exception as e:  # noqa: BLE001 - a new worker did not start: roll back
                    # One line: a Ray task error carries the worker's traceback; its last line names the cause.
                    cause = ([x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__])[-1]
                    why = f"a new {pool} worker failed to start ({type(e).__name__}: {cause[:300]})"
                    logger.error("manifest %d: %s; rolling back", self.manifest_version, why)
                    back = await self._roll_back(old, old_json, before, started, drain_timeout_s)
                    return {"ok": False, "rolled_back": True, "changed": plan.changed,
                            "problems": [[f"pools.{pool}", f"{why}; rolled back to the previous manifest "
                                          f"(now version {self.manifest_version}, replicas {back})"]],
                            "started": started, "retired": retired, "manifest_version": self.manifest_version,
                            "replicas": back}
            for name, pool_spec in self.manifest.pools.items():
                if pool_spec.autoscaling is not None:
                    self._start_autoscaling(name)
            return {"ok": True, "manifest_version": self.manifest_version, "changed": plan.changed,
                    "rolled": plan.roll, "resized": plan.resize, "started": started, "retired": retired,
                    "experts": experts, "replicas": {p: len(self.live(p)) for p in self.manifest.pools}}

    async def _roll_back(self, old: Any, old_json: str, before: dict[str, int], started: list[str],
                         drain_timeout_s: float | None) -> dict[str, int]:
        """Back to the previous manifest after a failed rollout: ingresses take it again; every
        worker the rollout started is replaced by one built from the old manifest (a new one
        first, then the rollout's drained, so a pool never shrinks), and each pool goes back to
        the size it had. Returns the live replicas per pool."""
        self.manifest, self.manifest_json = old, old_json
        self.manifest_version += 1
        self.version += 1
        await self._publish()
        why = f"rollback to manifest {self.manifest_version}"
        for pool in self.manifest.pools:
            news = [self.workers[w] for w in started if w in self.workers and self.workers[w].pool == pool]
            target = before.get(pool, len(self.live(pool)))

            def olds() -> int:
                return len([r for r in self.live(pool) if r.worker_id not in started])

            for rec in news:
                if olds() < target:
                    try:
                        await self._create(pool, self._free_slot(pool))
                        await self._publish()
                    except Exception as e:  # noqa: BLE001 - keep the new worker rather than shrink
                        logger.error("%s: could not start an old-manifest %s worker (%s); keeping %s", why, pool,
                                     e, rec.worker_id)
                        continue
                await self.retire(rec.worker_id, why, drain_timeout_s)
            for _ in range(max(0, target - len(self.live(pool)))):  # old workers the rollout drained
                try:
                    await self._create(pool, self._free_slot(pool))
                    await self._publish()
                except Exception as e:  # noqa: BLE001 - serve at the size we have, and say so
                    logger.error("%s: could not restore %s to %d replicas (%s)", why, pool, target, e)
                    break
            self._samples.pop(pool, None)
        for name, pool_spec in self.manifest.pools.items():
            if pool_spec.autoscaling is not None:
                self._start_autoscaling(name)
        return {p: len(self.live(p)) for p in self.manifest.pools}
