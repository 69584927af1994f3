"""SLO-driven pool sizing: a pure policy (a decision from a metrics snapshot) that the
controller applies. Nothing here imports Ray, torch or a model.

Prefill and decode are sized separately (as DistServe/Dynamo's planner do):

- **prefill** from the prompt-token rate the pool computes and its queueing against the
  TTFT target: enough replicas that each runs at most ``TARGET_UTIL`` of its capacity
  (tokens per busy second, measured on the pool itself; the placement model's estimate
  when there is no measurement yet), and one more while the oldest request in a prefill
  queue has waited more than ``QUEUE_FRACTION`` of the TTFT target;
- **refused demand**: requests that TTFT admission (cluster/admission.py) answered with 429
  never reach a worker, yet they are demand the pool failed to serve in time: their prompt
  tokens count toward the first pool's prompt-token rate (prefill, or colocated), and any
  refusal in an interval asks for one more replica of that pool;
- **decode** from TPOT attainment (the fraction of decode steps no longer than the TPOT
  target: a step gives every running request one token) against ``slo.attainment``, and
  from KV occupancy (above ``KV_HIGH`` a replica is added before admission stalls).

Hysteresis, so that pools do not flap: up-thresholds and down-thresholds differ (a
replica is removed only when the remaining ones would stay under ``DOWN_UTIL`` /
``KV_LOW``); any change waits ``cooldown_s`` after the previous one; a scale-down also
needs the low load to have lasted ``cooldown_s``; scale-down removes one replica at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

# Busy fraction a replica is sized for; a pool is grown above it.
TARGET_UTIL = 0.7
# A pool shrinks only if the remaining replicas would stay under this busy fraction.
DOWN_UTIL = 0.4
# Prefill: grow when the oldest queued prompt has waited this fraction of the TTFT target.
QUEUE_FRACTION = 0.5
# Decode: grow above this KV occupancy; shrink only if the rest would stay under KV_LOW.
KV_HIGH = 0.8
KV_LOW = 0.5
# Fewer decode steps than this in an interval say nothing about TPOT attainment.
MIN_STEPS = 5
# Prefill capacity is measured once the pool's workers were busy this long (seconds, summed);
# before that the placement model's estimate stands in.
MEASURED_AFTER_S = 0.5


@dataclass(frozen=True)
class PoolSnapshot:
    """One pool over the last interval (sums/means over its live replicas)."""

    role: Literal["prefill", "decode"]
    replicas: int
    interval_s: float
    busy_frac: float = 0.0  # mean over replicas of (engine busy seconds / interval)
    prompt_tokens_per_s: float = 0.0  # prompt tokens computed per second, whole pool
    capacity_tokens_per_s: float | None = None  # one replica, when busy (measured or modelled)
    queue_wait_s: float = 0.0  # prefill: age of the oldest request not yet prefilled
    running: int = 0
    waiting: int = 0
    steps: int = 0  # decode steps in the interval
    slow_steps: int = 0  # of those, longer than the TPOT target
    kv_usage: float = 0.0  # KV blocks held / KV blocks, whole pool
    # Refused by TTFT admission (429) in the interval, all ingresses: this is the pool
    # requests reach first (prefill, or colocated).
    refused_per_s: float = 0.0
    refused_prompt_tokens_per_s: float = 0.0


@dataclass(frozen=True)
class Limits:
    min_replicas: int
    max_replicas: int
    cooldown_s: float


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions (per pool)."""

    last_change_s: float = -math.inf
    low_since_s: float | None = None


@dataclass(frozen=True)
class Decision:
    current: int
    target: int
    action: Literal["up", "down", "hold"]
    reason: str


def _want_prefill(s: PoolSnapshot, slo: SLO) -> tuple[int, str, bool]:
    """(replicas wanted, why, load is low enough to shrink)."""
    n = max(1, s.replicas)
    demand = s.prompt_tokens_per_s + s.refused_prompt_tokens_per_s
    if s.capacity_tokens_per_s:
        util = demand / (n * s.capacity_tokens_per_s)
        basis = (f"prompt tokens {demand:.0f}/s vs {s.capacity_tokens_per_s:.0f}/s per replica "
                 f"(utilisation {util:.2f})")
    else:
        util = s.busy_frac
        basis = f"busy {util:.2f}"
    util = max(util, s.busy_frac)
    want = max(1, math.ceil(n * util / TARGET_UTIL - 1e-9))
    why = f"{basis}, target {TARGET_UTIL}"
    want, why = _refused(s, n, want, why)
    if s.queue_wait_s > QUEUE_FRACTION * slo.ttft_s:
        want = max(want, n + 1)
        why = (f"oldest queued prompt waited {s.queue_wait_s * 1e3:.0f} ms > {QUEUE_FRACTION} x TTFT target "
               f"{slo.ttft_s * 1e3:.0f} ms; {why}")
    low = (n > 1 and n * util / (n - 1) < DOWN_UTIL and s.queue_wait_s < 0.2 * slo.ttft_s and s.waiting == 0
           and not s.refused_per_s)
    return want, why, low


def _refused(s: PoolSnapshot, n: int, want: int, why: str) -> tuple[int, str]:
    """Requests refused with 429 are demand: one more replica while any are refused."""
    if s.refused_per_s <= 0:
        return want, why
    return (max(want, n + 1), f"{s.refused_per_s:.2f} requests/s refused by TTFT admission "
            f"({s.refused_prompt_tokens_per_s:.0f} prompt tokens/s); {why}")


def _want_decode(s: PoolSnapshot, slo: SLO) -> tuple[int, str, bool]:
    n = max(1, s.replicas)
    want = max(1, math.ceil(n * s.busy_frac / TARGET_UTIL - 1e-9)) if s.waiting else n
    reasons = []
    attained = None
    if s.steps >= MIN_STEPS:
        attained = 1.0 - s.slow_steps / s.steps
        if attained < slo.attainment:
            want = max(want, n + 1)
            reasons.append(f"TPOT attainment {attained:.2f} < {slo.attainment} (target {slo.tpot_s * 1e3:.0f} ms)")
    if s.kv_usage > KV_HIGH:
        want = max(want, n + 1)
        reasons.append(f"KV occupancy {s.kv_usage:.2f} > {KV_HIGH}")
    if s.waiting and s.busy_frac > TARGET_UTIL:
        reasons.append(f"{s.waiting} waiting, busy {s.busy_frac:.2f}")
    if s.refused_per_s > 0:  # a colocated pool: requests reach it first
        want, why = _refused(s, n, want, "")
        reasons.append(why.rstrip("; "))
    if not reasons:
        reasons.append(f"TPOT attainment {'n/a' if attained is None else f'{attained:.2f}'}, "
                       f"KV occupancy {s.kv_usage:.2f}, busy {s.busy_frac:.2f}")
    low = (n > 1 and (attained is None or attained >= slo.attainment) and s.waiting == 0
           and n * s.kv_usage / (n - 1) < KV_LOW and n * s.busy_frac / (n - 1) < DOWN_UTIL
           and not s.refused_per_s)
    return want, "; ".join(reasons), low


def decide(s: PoolSnapshot, slo: SLO, limits: Limits, state: PolicyState, now_s: float) -> tuple[Decision, PolicyState]:
    """The pool's target size and why; ``now_s`` is a monotonic clock."""
    n = s.replicas
    if n < limits.min_replicas:
        return (Decision(n, limits.min_replicas, "up", f"{n} live < min_replicas {limits.min_replicas}"),
                replace(state, last_change_s=now_s, low_since_s=None))
    if n > limits.max_replicas:
        return (Decision(n, limits.max_replicas, "down", f"{n} live > max_replicas {limits.max_replicas}"),
                replace(state, last_change_s=now_s, low_since_s=None))
    want, why, low = (_want_prefill if s.role == "prefill" else _want_decode)(s, slo)
    cooling = now_s - state.last_change_s < limits.cooldown_s
    if want > n:
        target = min(want, limits.max_replicas)
        if target == n:
            return Decision(n, n, "hold", f"at max_replicas {n}: {why}"), replace(state, low_since_s=None)
        if cooling:
            return (Decision(n, n, "hold", f"cooldown ({limits.cooldown_s:.0f} s) after the last change: {why}"),
                    replace(state, low_since_s=None))
        return Decision(n, target, "up", why), replace(state, last_change_s=now_s, low_since_s=None)
    if low and n > limits.min_replicas:
        since = state.low_since_s if state.low_since_s is not None else now_s
        state = replace(state, low_since_s=since)
        if now_s - since >= limits.cooldown_s and not cooling:
            return (Decision(n, n - 1, "down", f"low load for {now_s - since:.0f} s: {why}"),
                    replace(state, last_change_s=now_s, low_since_s=None))
        return Decision(n, n, "hold", f"low load for {now_s - since:.0f} s (< cooldown): {why}"), state
    return Decision(n, n, "hold", why), replace(state, low_since_s=None)


# -- snapshots from worker health stats ------------------------------------------------------
def pool_snapshot(role: str, stats_now: dict[str, dict[str, Any]], stats_before: dict[str, dict[str, Any]],
                  interval_s: float, capacity_tokens_per_s: float | None = None,
                  modelled_capacity_tokens_per_s: float | None = None,
                  refused: tuple[float, float] = (0.0, 0.0)) -> PoolSnapshot:
    """A PoolSnapshot from the health stats of a pool's live workers now and one interval
    earlier (worker id -> stats; counters: busy_s, steps, slow_steps, prompt_tokens_computed).
    A worker without an earlier sample counts from zero. Capacity, when not given, is
    measured (prompt tokens computed per busy second over the workers' lifetimes) once the
    workers were busy long enough (MEASURED_AFTER_S) to say, else the placement model's
    (modelled_capacity_tokens_per_s, from the profiled latency model). refused: (requests,
    prompt tokens) refused by TTFT admission in the interval."""
    n = len(stats_now)
    dt = max(interval_s, 1e-6)
    busy = steps = slow = tokens = running = waiting = 0.0
    used = total = 0
    qwait = 0.0
    life_tokens = life_busy = 0.0
    for wid, s in stats_now.items():
        b = stats_before.get(wid, {})
        busy += max(0.0, s.get("busy_s", 0.0) - b.get("busy_s", 0.0))
        steps += max(0, s.get("steps", 0) - b.get("steps", 0))
        slow += max(0, s.get("slow_steps", 0) - b.get("slow_steps", 0))
        tokens += max(0, s.get("prompt_tokens_computed", 0) - b.get("prompt_tokens_computed", 0))
        running += s.get("running", 0)
        waiting += s.get("waiting", 0)
        t = int(s.get("kv_blocks_total", 0))
        total += t
        used += t - int(s.get("kv_blocks_free", t))
        qwait = max(qwait, float(s.get("queue_wait_s", 0.0)))
        life_tokens += s.get("prompt_tokens_computed", 0)
        life_busy += s.get("busy_s", 0.0)
    if capacity_tokens_per_s is None and role == "prefill":
        if life_busy > MEASURED_AFTER_S and life_tokens > 0:
            capacity_tokens_per_s = life_tokens / life_busy
        else:
            capacity_tokens_per_s = modelled_capacity_tokens_per_s
    return PoolSnapshot(
        role="prefill" if role == "prefill" else "decode", replicas=n, interval_s=dt,
        busy_frac=min(1.0, busy / (dt * n)) if n else 0.0, prompt_tokens_per_s=tokens / dt,
        capacity_tokens_per_s=capacity_tokens_per_s, queue_wait_s=qwait, running=int(running),
        waiting=int(waiting), steps=int(steps), slow_steps=int(slow), kv_usage=used / total if total else 0.0,
        refused_per_s=refused[0] / dt, refused_prompt_tokens_per_s=refused[1] / dt)


def modelled_prefill_capacity(latency: Any, budget: int, mean_prompt: float) -> float:
    """Prompt tokens per busy second of one replica by the placement model: full-budget
    steps of prompts of the workload's mean length (placement.latency.LatencyModel)."""
    per = max(1, int(mean_prompt))
    lens = [per] * max(1, budget // per) if per <= budget else [budget]
    return sum(lens) / latency.prefill_s(lens)
