"""Ray placement groups for workers: the one module that creates them.

A worker (a pool replica) gets one placement group: a bundle per tensor-parallel rank
(``{"CPU": num_cpus, "GPU": num_gpus}``), STRICT_PACK so that the ranks share a node, and,
when the plan names a node, each bundle also asks for a sliver of Ray's built-in
``node:<ip>`` resource so that the group can only be placed there. Rank 0 (the worker
actor) runs in bundle 0 and rank r in bundle r. The controller removes the group when the
worker is replaced or the deployment is torn down.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# Enough of ``node:<ip>`` (1.0 per node) to pin a bundle without using the resource up.
NODE_PIN = 0.001


class PlacementGroupError(RuntimeError):
    """A worker's placement group could not be placed; the message names the pool, the
    node and the resources."""


@dataclass
class WorkerGroup:
    pg: PlacementGroup
    bundles: list[dict[str, float]]
    node_ip: str | None

    @property
    def id_hex(self) -> str:
        return self.pg.id.hex()

    def strategy(self, bundle: int = 0) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle,
                                                placement_group_capture_child_tasks=False)

    def remove(self) -> None:
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001 - already removed, or Ray is going down
            pass


def worker_bundles(tp: int, num_cpus: float, num_gpus: float, node_ip: str | None) -> list[dict[str, float]]:
    bundle: dict[str, float] = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    if node_ip:
        bundle[f"node:{node_ip}"] = NODE_PIN
    return [dict(bundle) for _ in range(tp)]


def _node_report(node_ip: str | None, bundles: list[dict[str, float]]) -> str:
    """What the named node (or the cluster) has, for the error message."""
    alive = {n["NodeManagerAddress"]: n for n in ray.nodes() if n.get("Alive")}
    need = {k: v * len(bundles) for k, v in bundles[0].items() if not k.startswith("node:")}
    if node_ip is not None and node_ip not in alive:
        return f"node {node_ip} is not an alive Ray node (alive: {sorted(alive)})"
    try:
        avail = ray.available_resources() if node_ip is None else None
    except Exception:  # noqa: BLE001
        avail = None
    if node_ip is not None:
        total = alive[node_ip].get("Resources", {})
        have = {k: total.get(k, 0.0) for k in need}
        return (f"node {node_ip} has {have} in total (other workers may hold part of it); "
                f"needed {need}")
    have = {k: (avail or {}).get(k, 0.0) for k in need}
    return f"the cluster has {have} available; needed {need} on one node"


async def create_worker_group(pool: str, worker_id: str, tp: int, num_cpus: float, num_gpus: float,
                              node_ip: str | None, timeout_s: float, name_prefix: str | None = None) -> WorkerGroup:
    """Create and wait for a worker's placement group; on timeout remove it and raise
    PlacementGroupError naming the pool, node and resources."""
    bundles = worker_bundles(tp, num_cpus, num_gpus, node_ip)
    # Worker ids repeat across deployments (and replacements) in one Ray cluster: the
    # name (operators read it in `ray list placement-groups`; a revived controller finds
    # its deployment's groups by the prefix) is made unique. Detached: the group outlives
    # the controller process that made it, like its worker (cluster/revival.py).
    prefix = name_prefix or f"splitserve-{worker_id}"
    pg = placement_group(bundles, strategy="STRICT_PACK", name=f"{prefix}-{uuid.uuid4().hex[:8]}",
                         lifetime="detached")
    group = WorkerGroup(pg, bundles, node_ip)
    try:
        await asyncio.wait_for(asyncio.wrap_future(pg.ready().future()), timeout=timeout_s)
    except (asyncio.TimeoutError, Exception) as e:
        group.remove()
        where = f"on node {node_ip}" if node_ip else "on any one node"
        shown = [{k: v for k, v in b.items() if not k.startswith("node:")} for b in bundles]
        why = "timed out" if isinstance(e, asyncio.TimeoutError) else f"failed ({type(e).__name__}: {e})"
        raise PlacementGroupError(
            f"pools.{pool}: placement group for worker {worker_id} ({tp} bundle(s) {shown[0]}, STRICT_PACK "
            f"{where}) {why} after {timeout_s:g}s: {_node_report(node_ip, bundles)}") from None
    return group


def placement_of(group: WorkerGroup) -> dict[str, Any]:
    """Where Ray put the group: node id of each bundle."""
    table = ray.util.placement_group_table(group.pg)
    return {"id": group.id_hex, "state": table.get("state"),
            "bundles_to_node_id": dict(table.get("bundles_to_node_id", {}))}
