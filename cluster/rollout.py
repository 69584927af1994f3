"""What a changed manifest means for a running deployment (`splitserve apply`): which
fields cannot change without a restart, which pools roll out new workers, which only
resize. Pure: no Ray; the controller carries out the plan (cluster/controller.py).

An expert pool's changed ``placement`` is applied live without new workers (experts
loaded where they go, routing switched between steps, old copies dropped:
Controller.apply_expert_placement). Rolled out live: slo, kv_transfer (codec, level, transport, ...), a pool's worker
settings (num_cpus, batch and KV sizes, nodes, tp), replicas, autoscaling, the ingress's
timeouts and limits. A pool rolls by starting a new worker, then draining and removing an
old one, one at a time, so that it never serves with fewer workers than it had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.manifest import Manifest

# (field path, why) for what needs `splitserve serve` again.
RESTART_FIELDS: dict[str, str] = {
    "name": "names the deployment apply talks to",
    "model": "every worker and the ingress's tokenizer load it",
    "mode": "changes which pools exist",
    "pools": "adding or removing a pool changes the layout",
    "kv_cache.block_size": "the router and every worker's KV cache are laid out by it",
    "server.max_request_bytes": "the HTTP server's body limit is set when it starts",
    "server.api_keys_file": "the HTTP server reads its keys when it starts",
    "hardware": "what 'splitserve plan' may use; re-plan and serve again",
    "workload": "what 'splitserve plan' plans for; re-plan and serve again",
}
# Per pool, fields that need a restart.
POOL_RESTART_FIELDS: dict[str, str] = {
    "engine": "prefill and decode must run the same engine; a rollout would mix them",
    "micro_batches": "attention and expert workers must agree on it",
}
# Pool fields that only size the pool (no new workers needed).
SIZE_FIELDS = ("replicas", "autoscaling")


@dataclass
class RolloutPlan:
    restart: list[tuple[str, str]] = field(default_factory=list)  # (field path, reason)
    roll: list[str] = field(default_factory=list)  # pools whose workers are replaced
    resize: dict[str, int] = field(default_factory=dict)  # pool -> new replica count
    changed: list[str] = field(default_factory=list)  # field paths that changed
    placement: bool = False  # the expert pool's placement changed: re-place experts live

    @property
    def ok(self) -> bool:
        return not self.restart


def _get(d: Any, path: str) -> Any:
    for key in path.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "<root>"]


def worker_settings(m: Manifest, pool: str) -> dict[str, Any]:
    """What a worker of the pool is built from, apart from the model: a change means new workers."""
    # The expert placement changes without new workers (Controller.apply_expert_placement).
    p = m.pools[pool].model_dump(exclude={*SIZE_FIELDS, "placement"})  # type: ignore[index]
    return {"pool": p, "kv_transfer": m.kv_transfer.model_dump(), "slo": m.slo.model_dump(),
            "prefix_caching": m.kv_cache.enable_prefix_caching,
            "timeouts": (m.server.request_timeout_s, m.server.token_timeout_s)}


def plan_rollout(old: Manifest, new: Manifest, live: dict[str, int] | None = None) -> RolloutPlan:
    """The plan from the running manifest to the new one; ``live`` is each pool's live
    replica count (an autoscaled pool keeps its size when it is within the new limits)."""
    a, b = old.model_dump(), new.model_dump()
    plan = RolloutPlan(changed=_diff(a, b))
    for path, why in RESTART_FIELDS.items():
        if path == "pools":
            if set(old.pools) != set(new.pools):
                plan.restart.append(("pools", f"{sorted(old.pools)} -> {sorted(new.pools)}: {why}"))
            continue
        if _get(a, path) != _get(b, path):
            plan.restart.append((path, f"changed ({why}); needs a restart: splitserve serve again"))
    for name in sorted(set(old.pools) & set(new.pools)):
        po, pn = old.pools[name], new.pools[name]
        for f, why in POOL_RESTART_FIELDS.items():
            if getattr(po, f) != getattr(pn, f):
                plan.restart.append((f"pools.{name}.{f}", f"changed ({why}); needs a restart"))
        if name in ("attention", "expert") and (po.replicas != pn.replicas or po.tp != pn.tp):
            plan.restart.append((f"pools.{name}.replicas", "attention/expert pools are sized by the expert "
                                 "placement; needs a restart"))
        if name == "expert" and po.placement != pn.placement:
            plan.placement = True
        if worker_settings(old, name) != worker_settings(new, name):
            plan.roll.append(name)
        have = (live or {}).get(name, po.replicas)
        want = pn.replicas
        if pn.autoscaling is not None:
            want = min(max(have, pn.autoscaling.min_replicas), pn.autoscaling.max_replicas)
            if po.replicas != pn.replicas:
                want = pn.replicas
        if want != have:
            plan.resize[name] = want
    return plan
