"""What `splitserve apply` does with a changed manifest (cluster/rollout.py), no Ray."""

from __future__ import annotations

from cluster.manifest import parse_manifest
from cluster.rollout import plan_rollout


def manifest(**over: object):
    data: dict = {"name": "d", "model": {"builtin": "tiny-llama"},
                  "pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}}
    data.update(over)
    return parse_manifest(data)


def test_slo_and_codec_roll_every_pool() -> None:
    old = manifest()
    new = manifest(slo={"ttft_ms": 500}, kv_transfer={"codec": "int8"})
    p = plan_rollout(old, new)
    assert p.ok and sorted(p.roll) == ["decode", "prefill"] and not p.resize
    assert "slo.ttft_ms" in p.changed and "kv_transfer.codec" in p.changed


def test_pool_settings_roll_that_pool_and_replicas_resize() -> None:
    old = manifest()
    new = manifest(pools={"prefill": {"replicas": 1, "max_num_batched_tokens": 128}, "decode": {"replicas": 3}})
    p = plan_rollout(old, new)
    assert p.ok and p.roll == ["prefill"] and p.resize == {"decode": 3}


def test_autoscaled_pool_keeps_its_live_size_within_new_limits() -> None:
    auto = {"replicas": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 2}}
    old = manifest(pools={"prefill": {"replicas": 1, "autoscaling": {"max_replicas": 3}}, "decode": {}})
    new = manifest(pools={"prefill": auto, "decode": {}})
    p = plan_rollout(old, new, live={"prefill": 3, "decode": 1})
    assert p.ok and p.resize == {"prefill": 2} and not p.roll
    assert plan_rollout(old, old, live={"prefill": 2, "decode": 1}).resize == {}


def test_fields_that_need_a_restart_are_named() -> None:
    old = manifest()
    new = manifest(name="other", model={"builtin": "small-llama"}, kv_cache={"block_size": 32},
                   server={"max_request_bytes": 4096},
                   pools={"prefill": {"engine": "vllm"}, "decode": {"engine": "vllm"}})
    p = plan_rollout(old, new)
    fields = [f for f, _ in p.restart]
    assert not p.ok
    for f in ("name", "model", "kv_cache.block_size", "server.max_request_bytes", "pools.prefill.engine",
              "pools.decode.engine"):
        assert f in fields, fields
    assert all("restart" in why or "->" in why for _, why in p.restart)
    colo = manifest(mode="colocated", pools={"colocated": {}})
    assert [f for f, _ in plan_rollout(old, colo).restart] == ["mode", "pools"]


def test_unchanged_manifest_is_a_no_op() -> None:
    p = plan_rollout(manifest(), manifest())
    assert p.ok and not p.roll and not p.resize and not p.changed


def test_changed_expert_placement_is_applied_live_without_new_workers() -> None:
    pools = {"prefill": {"replicas": 1}, "attention": {"replicas": 1},
             "expert": {"replicas": 2, "placement": "even"}}
    old = manifest(model={"builtin": "tiny-mixtral"}, mode="disaggregated", pools=pools)
    layers = [[[0, 1, 2, 3, 4], [4, 5, 6, 7]] for _ in range(4)]
    new = manifest(model={"builtin": "tiny-mixtral"}, mode="disaggregated",
                   pools={**pools, "expert": {"replicas": 2, "placement": layers}})
    p = plan_rollout(old, new)
    assert p.ok and p.placement and p.roll == [] and p.resize == {}
    assert "pools.expert.placement" in p.changed
    assert not plan_rollout(new, new).placement
    # micro_batches still needs a restart (attention and expert workers must agree).
    mb = manifest(model={"builtin": "tiny-mixtral"}, mode="disaggregated",
                  pools={**pools, "expert": {"replicas": 2, "micro_batches": 1}})
    assert [path for path, _ in plan_rollout(old, mb).restart] == ["pools.expert.micro_batches"]
