"""Picks workers for a request: the least-loaded prefill worker (prompt tokens in flight),
and the decode worker with the most free KV blocks, preferring one on the prefill
worker's node (the KV does not cross the network)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import NoHealthyPoolError

# Seconds a worker that failed a request stays out of routing, unless replaced sooner.
FAILED_HOLD_S = 3.0
# Free-block advantage a remote decode worker needs over a local one (KV transfer cost).
CROSS_NODE_PENALTY_BLOCKS = 8


@dataclass
class WorkerView:
    worker_id: str
    pool: str
    handle: Any
    node_ip: str | None
    healthy: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    # Requests this ingress has sent and not seen finish.
    inflight: int = 0
    # Prompt tokens (prefill) or KV blocks (decode) of those requests.
    inflight_load: int = 0
    # Monotonic time until which a locally observed failure keeps the worker out.
    failed_until: float = 0.0
    # Requests of this ingress that involve the worker from pick to finish (a prefill
    # worker's KV until the decode worker took it, a decode worker's before its KV came).
    held: int = 0
    # Prompt tokens of this ingress's requests sent here and not yet at their first token.
    queued_tokens: int = 0


class Router:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.version = -1
        self.pools: dict[str, dict[str, WorkerView]] = {}

    def update(self, state: dict[str, Any]) -> None:
        """Take a controller snapshot; keeps local in-flight counts of known workers."""
        pools: dict[str, dict[str, WorkerView]] = {}
        # Workers gone from the snapshot keep their views while this ingress holds
        # requests on them (so that hold/unhold pair up); they are not routed to.
        for pool, old_views in self.pools.items():
            for wid, view in old_views.items():
                if view.held > 0:
                    view.healthy = False
                    pools.setdefault(pool, {})[wid] = view
        for pool, workers in state["pools"].items():
            old = self.pools.get(pool, {})
            cur: dict[str, WorkerView] = {}
            for w in workers:
                view = old.get(w["worker_id"]) or WorkerView(w["worker_id"], pool, w["handle"], w["node_ip"])
                # A worker this ingress saw fail stays out until the controller confirms it.
                view.healthy = bool(w["healthy"]) and time.monotonic() >= view.failed_until
                view.stats = w.get("stats") or {}
                cur[w["worker_id"]] = view
            pools.setdefault(pool, {}).update(cur)
        self.pools = pools
        self.version = state["version"]

    def healthy(self, pool: str) -> list[WorkerView]:
        return [w for w in self.pools.get(pool, {}).values() if w.healthy and not w.stats.get("draining")]

    def _need(self, pool: str) -> list[WorkerView]:
        ws = self.healthy(pool)
        if not ws:
            raise NoHealthyPoolError(f"no healthy {pool} worker; the controller is replacing it, "
                                     "retry shortly")
        return ws

    def pick_prefill(self) -> WorkerView:
        return min(self._need("prefill"), key=lambda w: (w.inflight_load, w.inflight))

    def _free_blocks(self, w: WorkerView) -> int:
        total = int(w.stats.get("kv_blocks_total", 0))
        reported = int(w.stats.get("kv_blocks_free", total))
        return min(reported, total - w.inflight_load)

    def pick_decode(self, pool: str = "decode", near: str | None = None) -> WorkerView:
        def score(w: WorkerView) -> tuple[int, int]:
            free = self._free_blocks(w)
            if near is not None and w.node_ip != near:
                free -= CROSS_NODE_PENALTY_BLOCKS
            return (-free, w.inflight)

        return min(self._need(pool), key=score)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def begin(self, w: WorkerView, load: int) -> None:
        w.inflight += 1
        w.inflight_load += load

    def end(self, w: WorkerView, load: int) -> None:
        w.inflight -= 1
        w.inflight_load -= load

    def hold(self, w: WorkerView) -> None:
        w.held += 1

    def unhold(self, w: WorkerView) -> None:
        w.held -= 1

    def held(self) -> dict[str, int]:
        """Worker id -> requests this ingress holds on it (the controller drains by it)."""
        return {wid: w.held for pool in self.pools.values() for wid, w in pool.items() if w.held > 0}

    def mark_failed(self, worker_id: str) -> None:
        for pool in self.pools.values():
            if worker_id in pool:
                pool[worker_id].healthy = False
                pool[worker_id].failed_until = time.monotonic() + FAILED_HOLD_S
