"""Scaling a manifest to N fake nodes, and what a layout counts as its accelerators."""

from __future__ import annotations

from pathlib import Path

from benchmarks.targets import manifest_cpus, manifest_gpus, scale_manifest
from cluster.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_scale_pins_one_copy_of_every_pool_per_node():
    m = load_manifest(ROOT / "deploy" / "manifests" / "demo.yaml")
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    s = scale_manifest(m, ips)
    assert s.name == "demo-n3"
    for name, pool in s.pools.items():
        assert pool.replicas == 3 * m.pools[name].replicas
        assert pool.nodes == ips  # round-robin by replica slot: one per node
        assert pool.num_cpus == m.pools[name].num_cpus
    assert s.slo == m.slo and s.kv_cache == m.kv_cache
    assert manifest_gpus(m) == (2.0, "cpu") and manifest_gpus(s) == (6.0, "cpu")
    assert manifest_cpus(s) == 6.0


def test_gpus_win_over_cpus_when_pools_ask_for_them():
    m = load_manifest(ROOT / "deploy" / "manifests" / "demo-colocated.yaml")
    data = m.model_dump(mode="json")
    data["pools"]["colocated"].update(num_gpus=1, tp=3, replicas=3)
    from cluster.manifest import parse_manifest

    assert manifest_gpus(parse_manifest(data)) == (9.0, "gpu")
