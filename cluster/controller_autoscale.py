"""The controller's autoscaling (issue 15): per autoscaled pool a loop that snapshots the
pool's health stats, asks the pure policy (cluster/autoscale.py) for a size, and applies it:
scale-up asks Ray's autoscaler for the resources and starts workers; scale-down drains the
least loaded workers (Controller.retire). A mixin of cluster.controller.Controller: it uses
the controller's workers, lock and creation/retirement methods."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger("cluster.controller")


class AutoscaleMixin:
    # Provided by Controller.
    manifest: Any
    autoscale: dict[str, dict[str, Any]]
    _policy: dict[str, Any]
    _samples: dict[str, tuple[float, dict[str, dict[str, Any]]]]
    _autoscale_tasks: list[asyncio.Task[None]]
    _retire_tasks: set[asyncio.Task[None]]
    _stopping: bool
    _lock: asyncio.Lock
    refused_reports: dict[str, tuple[int, int]]
    _refused_seen: dict[str, dict[str, tuple[int, int]]]
    _modelled: dict[str, float | None]

    def _request_resources(self) -> None:
        """Tell Ray's autoscaler what every pool needs at its target size (it brings up
        nodes for bundles that do not fit; without an autoscaler this is a no-op)."""
        bundles: list[dict[str, float]] = []
        # The whole deployment's shape (request_resources sets the cluster's total demand).
        for name, pool in self.manifest.pools.items():
            target = self.autoscale.get(name, {}).get("target", len(self.live(name)))
            bundle = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {})}
            bundles += [dict(bundle) for _ in range(target * pool.tp)]
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        except Exception as e:  # noqa: BLE001 - no autoscaler API here: placement still tries
            logger.warning("request_resources failed: %s", e)

    def _pool_snapshot(self, pool: str) -> Any:
        from cluster.autoscale import pool_snapshot

        now = time.monotonic()
        cur = {r.worker_id: dict(r.stats) for r in self.live(pool) if r.healthy}
        before_t, before = self._samples.get(pool, (now, {}))
        self._samples[pool] = (now, cur)
        role = "prefill" if pool == "prefill" else "decode"
        return pool_snapshot(role, cur, before, now - before_t if before else 0.0,
                             modelled_capacity_tokens_per_s=self._modelled_capacity(pool) if role == "prefill" else None,
                             refused=self._refused_since(pool))

    def _refused_since(self, pool: str) -> tuple[float, float]:
        """(requests, prompt tokens) the ingresses' TTFT admission refused since this pool's
        last snapshot (the first snapshot only takes the counts: what was refused before
        autoscaling started is not this interval's demand); refusals are charged to the
        pool requests reach first."""
        first = "prefill" if self.manifest.mode == "disaggregated" else "colocated"
        if pool not in self._refused_seen:
            self._refused_seen[pool] = dict(self.refused_reports)
            return 0.0, 0.0
        seen = self._refused_seen[pool]
        reqs = toks = 0
        for rid, (r, t) in list(self.refused_reports.items()):
            r0, t0 = seen.get(rid, (0, 0))  # an ingress that appeared since: counts from 0
            reqs += max(0, r - r0)
            toks += max(0, t - t0)
            seen[rid] = (r, t)
        if pool != first:
            return 0.0, 0.0
        return float(reqs), float(toks)

    def _modelled_capacity(self, pool: str) -> float | None:
        """One replica's prompt tokens per busy second by the placement model: the latency
        model profiled on this machine (hardware.profile, else a cached `splitserve profile`
        of this model at the pool's thread count); None without a profile."""
        if pool in self._modelled:
            return self._modelled[pool]
        cap = None
        try:
            from pathlib import Path

            from cluster.autoscale import modelled_prefill_capacity
            from placement.profile import find_cached_profile, latency_model, load_profile

            spec = self.manifest.pools[pool]
            hw = self.manifest.hardware
            lat = None
            if hw is not None and hw.profile:
                path = Path(hw.profile)
                lat = load_profile(path if path.is_absolute() else Path(self.manifest.base_dir) / path)
            else:
                prof = find_cached_profile(self.manifest.model_dir(), self.manifest.model.dtype,
                                           max(1, int(spec.num_cpus)))
                lat = latency_model(prof) if prof is not None else None
            if lat is not None:
                wl = self.manifest.workload
                cap = modelled_prefill_capacity(lat, spec.max_num_batched_tokens, sum(wl.prompt_tokens) / 2)
                logger.info("autoscale %s: modelled capacity %.0f prompt tokens/s per replica", pool, cap)
        except Exception as e:  # noqa: BLE001 - measured capacity only
            logger.warning("autoscale %s: no modelled capacity (%s)", pool, e)
        self._modelled[pool] = cap
        return cap

    async def _autoscale_loop(self, pool: str) -> None:
        spec = self.manifest.pools[pool].autoscaling  # type: ignore[index]
        assert spec is not None
        self.autoscale[pool] = {"target": len(self.live(pool)), "decisions": {"up": 0, "down": 0, "hold": 0},
                                "unfulfilled": 0, "reason": "", "short_by": 0}
        self._pool_snapshot(pool)
        while not self._stopping:
            spec = self.manifest.pools[pool].autoscaling  # type: ignore[index]
            if spec is None:  # a rollout turned it off
                return
            await asyncio.sleep(spec.interval_s)
            try:
                await self.autoscale_once(pool)
            except Exception:  # noqa: BLE001 - keep serving at the current size
                logger.exception("autoscaling %s failed; keeping its size", pool)

    async def autoscale_once(self, pool: str) -> dict[str, Any]:
        """One sizing decision for the pool and its application; returns the decision."""
        async with self._lock:
            if self.manifest.pools[pool].autoscaling is None:  # type: ignore[index]
                return {"pool": pool, "action": "hold", "reason": "autoscaling off"}
            return await self._autoscale_once(pool)

    async def _autoscale_once(self, pool: str) -> dict[str, Any]:
        from cluster.autoscale import SLO, Limits, PolicyState, decide

        pool_spec = self.manifest.pools[pool]  # type: ignore[index]
        spec = pool_spec.autoscaling
        assert spec is not None
        slo = self.manifest.slo
        snap = self._pool_snapshot(pool)
        state = self._policy.get(pool, PolicyState())
        decision, self._policy[pool] = decide(snap, SLO(slo.ttft_ms / 1e3, slo.tpot_ms / 1e3, slo.attainment),
                                              Limits(spec.min_replicas, spec.max_replicas, spec.cooldown_s),
                                              state, time.monotonic())
        a = self.autoscale[pool]
        a["decisions"][decision.action] += 1
        a["reason"] = decision.reason
        a["target"] = decision.target
        if decision.action == "hold":
            logger.debug("autoscale %s: hold at %d (%s)", pool, decision.current, decision.reason)
        else:
            logger.info("autoscale %s: %s %d -> %d (%s)", pool, decision.action, decision.current,
                        decision.target, decision.reason)
        if decision.action == "up":
            self._request_resources()
            results = await asyncio.gather(*(self._create(pool, self._free_slot(pool))
                                             for _ in range(decision.target - decision.current)),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            a["short_by"] = len(failed)
            if failed:
                a["unfulfilled"] += 1
                a["target"] = len(self.live(pool))
                self._request_resources()  # withdraw what could not be placed
                logger.warning("autoscale %s: the cluster could not place %d of %d new replicas (%s); "
                               "serving with %d", pool, len(failed), len(results), failed[0],
                               len(self.live(pool)))
            await self._publish()
        elif decision.action == "down":
            live = self.live(pool)
            # The least loaded replicas go first.
            victims = sorted(live, key=lambda r: (r.stats.get("running", 0) + r.stats.get("waiting", 0),
                                                  -r.slot))[:decision.current - decision.target]
            for rec in victims:
                why = f"autoscale: {decision.reason}"
                task = asyncio.get_running_loop().create_task(self.retire(rec.worker_id, why))
                self._retire_tasks.add(task)
                task.add_done_callback(self._retire_tasks.discard)
            self._request_resources()
        return {"pool": pool, "action": decision.action, "current": decision.current,
                "target": decision.target, "reason": decision.reason}

    def _start_autoscaling(self, pool: str) -> None:
        if not any(not t.done() and t.get_name() == f"autoscale-{pool}" for t in self._autoscale_tasks):
            self._autoscale_tasks.append(asyncio.get_running_loop().create_task(self._autoscale_loop(pool),
                                                                                name=f"autoscale-{pool}"))
