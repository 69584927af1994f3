"""Controller revival: the controller is a detached actor that Ray restarts when its process
dies (``max_restarts``); the restarted one re-adopts the workers that are still alive.

What makes that possible: every worker actor and its placement group are detached (they
outlive the controller process that created them; before, a worker fate-shared with its
creator, so losing the controller lost every worker and every request on them) and named
after the deployment (``worker_actor_name``, ``group_name_prefix``). Ray re-runs the
controller's constructor with the same arguments, so the deployment's KV token (made by
``start_controller``, passed in) is the same and replacement workers can still fetch KV
from adopted ones.

While the controller is down, ingresses keep serving on their last snapshot (their calls
go straight to the workers; only the state refresh and failure reports need the
controller). The revived controller, on its first call, looks up the deployment's named
workers, asks each for its health, adopts those that answer (pool and slot from the worker
id, placement group from the worker's own report), kills those that do not, removes the
deployment's placement groups that no adopted worker uses (a worker that died meanwhile,
a creation cut short), creates what the pools are missing, then resumes health checks,
publishing and autoscaling. Until then it answers ``get_state`` with an error, so that
ingresses keep their snapshot rather than take an empty one.

Lost on revival (held only in the dead process): a manifest applied live since deploy
(the controller comes back with the deployed one), autoscaling history, drains in
progress, replacement counts.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import ray

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0
_WORKER_ID = re.compile(r"^(?P<pool>[a-z]+)-(?P<slot>\d+)-g(?P<gen>\d+)$")


def worker_actor_name(deployment: str, worker_id: str) -> str:
    return f"splitserve-worker:{deployment}:{worker_id}"


def group_name_prefix(deployment: str, worker_id: str = "") -> str:
    return f"splitserve-{deployment}:{worker_id}"


def remove_leftovers(deployment: str) -> int:
    """Kill the deployment's named workers and remove its placement groups (detached: they
    do not die with the controller). After a controller's shutdown, in case it could not
    finish (a timeout under load); before a new controller of the same name starts.
    Returns how many workers were killed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    n = 0
    prefix = worker_actor_name(deployment, "")
    for name in ray.util.list_named_actors():
        if isinstance(name, str) and name.startswith(prefix):
            try:
                ray.kill(ray.get_actor(name), no_restart=True)
                n += 1
            except Exception:  # noqa: BLE001 - gone meanwhile
                pass
    gprefix = group_name_prefix(deployment)
    for pg_id, info in ray.util.placement_group_table().items():
        if str(info.get("name", "")).startswith(gprefix) and info.get("state") != "REMOVED":
            try:
                ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
            except Exception:  # noqa: BLE001
                pass
    return n


class RevivingError(RuntimeError):
    """The controller was restarted and is re-adopting its workers; ask again shortly."""


async def adopt(ctl: Any) -> int:
    """Re-adopt the live workers of ctl's deployment into ctl.workers; returns how many.
    Also cleans up what belongs to no live worker and creates missing replicas."""
    from cluster.records import WorkerRecord
    from placement.groups import WorkerGroup, worker_bundles
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    prefix = worker_actor_name(ctl.deployment, "")
    names = [n for n in ray.util.list_named_actors() if isinstance(n, str) and n.startswith(prefix)]

    async def look(name: str) -> tuple[str, Any, dict[str, Any] | None]:
        try:
            handle = ray.get_actor(name)
        except ValueError:
            return name, None, None
        try:
            stats = await asyncio.wait_for(handle.health.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - dead or hung: not adopted
            logger.warning("not adopting %s: %s", name, type(e).__name__)
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            return name, handle, None
        return name, handle, stats

    found = await asyncio.gather(*(look(n) for n in names))
    top_gen = -1
    used_groups: set[str] = set()
    for name, handle, stats in found:
        worker_id = name[len(prefix):]
        m = _WORKER_ID.match(worker_id)
        if handle is None or stats is None or m is None or m["pool"] not in ctl.manifest.pools:
            continue
        pool = ctl.manifest.pools[m["pool"]]
        slot = int(m["slot"])
        top_gen = max(top_gen, int(m["gen"]))
        planned = pool.nodes[slot % len(pool.nodes)] if pool.nodes else None
        group = None
        if stats.get("placement_group"):
            pg = PlacementGroup(PlacementGroupID.from_hex(stats["placement_group"]))
            group = WorkerGroup(pg, worker_bundles(pool.tp, pool.num_cpus, pool.num_gpus, planned), planned)
            used_groups.add(stats["placement_group"])
        rec = WorkerRecord(worker_id, m["pool"], slot, handle, node_ip=stats.get("node_ip"), group=group)
        rec.stats = stats
        rec.healthy = True
        ctl.workers[worker_id] = rec
    ctl.bump_ids(top_gen + 1)
    # Placement groups of this deployment that no adopted worker runs in.
    gprefix = group_name_prefix(ctl.deployment)
    for pg_id, info in ray.util.placement_group_table().items():
        if (str(info.get("name", "")).startswith(gprefix) and info.get("state") != "REMOVED"
                and pg_id not in used_groups):
            logger.warning("removing placement group %s (%s): no live worker", info.get("name"), pg_id)
            try:
                ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
            except Exception:  # noqa: BLE001
                pass
    adopted = len(ctl.workers)
    # What the pools miss (workers that died with or after the controller).
    missing = []
    for name, pool in ctl.manifest.pools.items():
        have = {r.slot for r in ctl.workers.values() if r.pool == name}
        missing += [(name, s) for s in range(pool.replicas) if s not in have]
    results = await asyncio.gather(*(ctl._create(p, s) for p, s in missing), return_exceptions=True)
    for (p, s), r in zip(missing, results):
        if isinstance(r, BaseException):
            logger.error("revived controller could not create %s slot %d: %s", p, s, r)
    logger.warning("controller revived: adopted %d live worker(s) of %s, created %d", adopted, ctl.deployment,
                   sum(1 for r in results if not isinstance(r, BaseException)))
    return adopted
