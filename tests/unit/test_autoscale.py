"""The autoscaling policy (cluster/autoscale.py): decisions from metrics snapshots, no Ray."""

from __future__ import annotations

import pytest

from cluster.autoscale import SLO, Limits, PolicyState, PoolSnapshot, decide, pool_snapshot
from cluster.errors import ManifestError
from cluster.manifest import parse_manifest

SLO_ = SLO(ttft_s=1.0, tpot_s=0.1, attainment=0.9)
LIM = Limits(min_replicas=1, max_replicas=3, cooldown_s=30)


def prefill(n: int, busy: float, qwait: float = 0.0, rate: float = 0.0, cap: float | None = None,
            waiting: int = 0) -> PoolSnapshot:
    return PoolSnapshot("prefill", n, 5.0, busy_frac=busy, prompt_tokens_per_s=rate, capacity_tokens_per_s=cap,
                        queue_wait_s=qwait, waiting=waiting)


def decode(n: int, steps: int = 100, slow: int = 0, kv: float = 0.1, busy: float = 0.2,
           waiting: int = 0) -> PoolSnapshot:
    return PoolSnapshot("decode", n, 5.0, busy_frac=busy, steps=steps, slow_steps=slow, kv_usage=kv, waiting=waiting)


def test_prefill_sized_from_prompt_rate_and_capacity() -> None:
    # 2000 tok/s at 1000 tok/s per replica and 70 % target utilisation: 3 replicas.
    d, _ = decide(prefill(1, 1.0, rate=2000, cap=1000), SLO_, LIM, PolicyState(), 100.0)
    assert (d.action, d.target) == ("up", 3)
    assert "prompt tokens 2000/s" in d.reason
    # Capped at max_replicas.
    d, _ = decide(prefill(1, 1.0, rate=9000, cap=1000), SLO_, LIM, PolicyState(), 100.0)
    assert d.target == 3


def test_prefill_queueing_against_ttft_adds_a_replica() -> None:
    d, _ = decide(prefill(1, 0.3, qwait=0.8), SLO_, LIM, PolicyState(), 100.0)
    assert (d.action, d.target) == ("up", 2) and "TTFT target 1000 ms" in d.reason
    d, _ = decide(prefill(1, 0.3, qwait=0.2), SLO_, LIM, PolicyState(), 100.0)
    assert d.action == "hold"


def test_decode_from_tpot_attainment_and_kv() -> None:
    d, _ = decide(decode(1, steps=100, slow=20), SLO_, LIM, PolicyState(), 100.0)
    assert (d.action, d.target) == ("up", 2) and "attainment 0.80" in d.reason
    d, _ = decide(decode(2, kv=0.9), SLO_, LIM, PolicyState(), 100.0)
    assert (d.action, d.target) == ("up", 3) and "KV occupancy" in d.reason
    # Too few steps to judge attainment: no decision from it.
    d, _ = decide(decode(1, steps=2, slow=2), SLO_, LIM, PolicyState(), 100.0)
    assert d.action == "hold"


def test_hysteresis_cooldown_and_sustained_low_load() -> None:
    state = PolicyState()
    d, state = decide(prefill(1, 0.95), SLO_, LIM, state, 0.0)
    assert d.action == "up"
    # Still hot right after: the cooldown holds.
    d, state = decide(prefill(2, 0.95), SLO_, LIM, state, 10.0)
    assert d.action == "hold" and "cooldown" in d.reason
    # Idle: not removed until the low load lasted cooldown_s (and the cooldown passed).
    d, state = decide(prefill(2, 0.0), SLO_, LIM, state, 31.0)
    assert d.action == "hold" and "low load" in d.reason
    d, state = decide(prefill(2, 0.0), SLO_, LIM, state, 50.0)
    assert d.action == "hold"
    d, state = decide(prefill(2, 0.0), SLO_, LIM, state, 62.0)
    assert (d.action, d.target) == ("down", 1)
    # A load blip resets the low-load clock.
    state = PolicyState()
    _, state = decide(prefill(3, 0.0), SLO_, LIM, state, 0.0)
    _, state = decide(prefill(3, 0.5), SLO_, LIM, state, 20.0)
    d, state = decide(prefill(3, 0.0), SLO_, LIM, state, 40.0)
    assert d.action == "hold"


def test_no_flapping_in_the_dead_band() -> None:
    # Between the down threshold and the up threshold nothing moves, however long.
    state = PolicyState()
    for t in range(0, 600, 5):
        d, state = decide(prefill(2, 0.5), SLO_, LIM, state, float(t))
        assert d.action == "hold", d
        d2, _ = decide(decode(2, kv=0.35, busy=0.45), SLO_, LIM, state, float(t))
        assert d2.action == "hold", d2


def test_limits_are_enforced() -> None:
    d, _ = decide(prefill(0, 0.0), SLO_, LIM, PolicyState(), 0.0)
    assert (d.action, d.target) == ("up", 1)
    d, _ = decide(prefill(4, 0.0), SLO_, LIM, PolicyState(), 0.0)
    assert (d.action, d.target) == ("down", 3)
    d, _ = decide(prefill(3, 1.0, qwait=5.0), SLO_, LIM, PolicyState(), 0.0)
    assert d.action == "hold" and "max_replicas" in d.reason
    d, _ = decide(prefill(1, 0.0), SLO_, LIM, PolicyState(low_since_s=-1000), 0.0)
    assert d.action == "hold"  # at min_replicas


def test_snapshot_from_worker_stats() -> None:
    before = {"a": {"busy_s": 1.0, "steps": 10, "slow_steps": 1, "prompt_tokens_computed": 100}}
    now = {"a": {"busy_s": 3.0, "steps": 30, "slow_steps": 6, "prompt_tokens_computed": 1100, "running": 2,
                 "waiting": 1, "kv_blocks_total": 100, "kv_blocks_free": 40, "queue_wait_s": 0.3},
           "b": {"busy_s": 1.0, "steps": 5, "prompt_tokens_computed": 500, "kv_blocks_total": 100,
                 "kv_blocks_free": 100}}
    s = pool_snapshot("prefill", now, before, 4.0)
    assert s.replicas == 2 and s.busy_frac == pytest.approx(3.0 / 8)
    assert s.prompt_tokens_per_s == pytest.approx(1500 / 4)
    assert s.capacity_tokens_per_s == pytest.approx(1600 / 4.0)
    assert (s.steps, s.slow_steps, s.running, s.waiting) == (25, 5, 2, 1)
    assert s.kv_usage == pytest.approx(0.3) and s.queue_wait_s == 0.3


def test_requests_refused_by_admission_are_demand() -> None:
    from dataclasses import replace

    from cluster.autoscale import PoolSnapshot

    # Served 500 prompt tokens/s of 1000/s capacity (utilisation 0.5, no change) ...
    base = prefill(1, 0.5, rate=500, cap=1000)
    d, _ = decide(base, SLO_, LIM, PolicyState(), 100.0)
    assert d.action == "hold"
    # ... but 1500 more were refused with 429: demand 2000/s, 3 replicas at 70 %.
    d, _ = decide(replace(base, refused_per_s=15.0, refused_prompt_tokens_per_s=1500), SLO_, LIM, PolicyState(), 100.0)
    assert (d.action, d.target) == ("up", 3), d
    assert "refused by TTFT admission" in d.reason and "prompt tokens 2000/s" in d.reason
    # Without a capacity figure any refusal still asks for one more replica.
    d, _ = decide(replace(prefill(1, 0.3), refused_per_s=0.2, refused_prompt_tokens_per_s=20), SLO_, LIM,
                  PolicyState(), 100.0)
    assert (d.action, d.target) == ("up", 2)
    # A colocated pool (sized as decode) that refuses grows too.
    d, _ = decide(replace(decode(1), refused_per_s=1.0, refused_prompt_tokens_per_s=100), SLO_, LIM,
                  PolicyState(), 100.0)
    assert (d.action, d.target) == ("up", 2) and "refused" in d.reason
    # Refusals keep a pool from shrinking, however idle its workers look.
    idle = PoolSnapshot("prefill", 2, 5.0, busy_frac=0.01, refused_per_s=0.2)
    st = PolicyState()
    for t in (100.0, 200.0, 300.0):
        d, st = decide(idle, SLO_, LIM, st, t)
        assert d.action != "down"


def test_snapshot_refusals_and_modelled_capacity() -> None:
    from cluster.autoscale import modelled_prefill_capacity
    from placement.latency import Coeffs, LatencyModel

    lat = LatencyModel(Coeffs(0.01, 1e-3, 0.0), Coeffs(0.01, 1e-3, 0.0))
    cap = modelled_prefill_capacity(lat, budget=512, mean_prompt=128)
    assert cap == pytest.approx(512 / (0.01 + 0.512))  # four 128-token prompts per step
    # Barely busy workers: the model's capacity stands in for the measurement ...
    now = {"a": {"busy_s": 0.2, "prompt_tokens_computed": 100}}
    s = pool_snapshot("prefill", now, {}, 4.0, modelled_capacity_tokens_per_s=cap, refused=(2, 300))
    assert s.capacity_tokens_per_s == pytest.approx(cap)
    assert s.refused_per_s == pytest.approx(0.5) and s.refused_prompt_tokens_per_s == pytest.approx(75)
    # ... and once they were busy long enough, the measurement wins.
    now = {"a": {"busy_s": 2.0, "prompt_tokens_computed": 1000}}
    s = pool_snapshot("prefill", now, {}, 4.0, modelled_capacity_tokens_per_s=cap)
    assert s.capacity_tokens_per_s == pytest.approx(500.0)


def _manifest(pools: dict) -> dict:
    return {"model": {"builtin": "tiny-llama"}, "pools": pools}


def test_manifest_autoscaling_fields() -> None:
    m = parse_manifest(_manifest({"prefill": {"replicas": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                                                            "interval_s": 2, "cooldown_s": 5}}}))
    a = m.pools["prefill"].autoscaling
    assert a is not None and (a.max_replicas, a.interval_s) == (3, 2)
    with pytest.raises(ManifestError) as e:
        parse_manifest(_manifest({"decode": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}))
    assert "pools.decode.autoscaling" in str(e.value) and "min_replicas 3 > max_replicas 2" in str(e.value)
    with pytest.raises(ManifestError) as e:
        parse_manifest(_manifest({"decode": {"replicas": 5, "autoscaling": {"max_replicas": 3}}}))
    assert "pools.decode.replicas" in str(e.value)
    with pytest.raises(ManifestError) as e:
        parse_manifest(_manifest({"decode": {"autoscaling": {"max_replica": 3}}}))
    assert "pools.decode.autoscaling.max_replica" in str(e.value)


def test_controller_counts_what_ingresses_refused() -> None:
    """The controller (no Ray needed to build it) turns the ingresses' cumulative refusal
    counts into the refusals of each interval, charged to the pool requests reach first."""
    from cluster.controller import Controller

    m = parse_manifest(_manifest({"prefill": {"replicas": 1}, "decode": {"replicas": 1}}))
    c = Controller(m.model_dump_json())
    c.get_state("ingress-a", 0, {}, (5, 500))  # refused before autoscaling looked: not counted
    assert c._refused_since("prefill") == (0.0, 0.0) and c._refused_since("decode") == (0.0, 0.0)
    c.get_state("ingress-a", 0, {}, (8, 800))
    c.get_state("ingress-b", 0, {}, (1, 40))  # a new ingress counts from zero
    assert c._refused_since("prefill") == (4.0, 340.0)
    assert c._refused_since("decode") == (0.0, 0.0)  # decode is never where requests arrive
    assert c._refused_since("prefill") == (0.0, 0.0)  # nothing new since
