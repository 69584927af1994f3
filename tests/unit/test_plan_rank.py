"""The plan-fidelity benchmark's pure parts (benchmarks/plan_rank.py) and the cheap,
cached engine profile it takes through `splitserve profile` (placement/profile.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.plan_rank import LAYOUTS, manifest_dict
from benchmarks.plan_rank_report import compare_rankings, ladder_goodput
from cluster.manifest import parse_manifest
from placement.profile import find_cached_profile, quick_shapes

ROOT = Path(__file__).resolve().parents[2]


def test_ladder_goodput_interpolates_the_crossing() -> None:
    # Crosses 0.9 halfway between 2 (0.95) and 3 (0.85).
    assert ladder_goodput([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.3], 0.9) == pytest.approx(2.5)
    # Meets it everywhere: the highest rate (a lower bound).
    assert ladder_goodput([1, 2], [1.0, 0.92], 0.9) == 2
    # Misses it at the first rate: between (0, 1.0) and (1, 0.4).
    assert ladder_goodput([1, 2], [0.4, 0.1], 0.9) == pytest.approx(1 / 6)
    # A dip and recovery above the crossing does not count: the first crossing wins.
    assert ladder_goodput([1, 2, 3], [0.95, 0.5, 0.95], 0.9) == pytest.approx(1 + 0.05 / 0.45)


def test_compare_rankings_order_and_ratios() -> None:
    ok = compare_rankings({"a": 2.0, "b": 1.0, "c": 0.5}, {"a": 2.1, "b": 1.0, "c": 0.52})
    assert ok["order_matches"] and ok["passed"] and ok["ratios_total"] == 3
    bad = compare_rankings({"a": 2.0, "b": 1.0, "c": 0.5}, {"a": 1.0, "b": 2.0, "c": 0.5})
    assert not bad["order_matches"] and not bad["passed"]
    far = compare_rankings({"a": 3.0, "b": 1.0}, {"a": 2.0, "b": 1.0})
    assert far["order_matches"] and not far["passed"]
    assert far["ratios"][0]["rel_error"] == pytest.approx(0.5)
    assert compare_rankings({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 0.5})["ratios"][0]["rel_error"] == math.inf


def test_layouts_are_valid_manifests_that_fit_two_cpus() -> None:
    for name in LAYOUTS:
        m = parse_manifest(manifest_dict(name), str(ROOT))
        assert sum(p.num_cpus * p.replicas for p in m.pools.values()) <= 2, name


def test_quick_shapes_cover_the_workload_with_few_samples() -> None:
    sets, points = quick_shapes(168, max_batch=16, budget=512)
    assert all(max(s) <= 168 for s in sets) and len(sets) >= 3
    assert {b for b, _ in points} >= {1, 16} and {c for _, c in points} >= {64, 168}
    # The decode setup the full grid needs (~97k prompt tokens) against the corners'.
    assert sum(b * c for b, c in points) < 3000


def test_profile_cli_measures_once_then_reads_the_cache(tmp_path) -> None:
    """`splitserve profile` on a workload-bounded manifest: measured the first time, the
    same profile from the cache the second, and the autoscaler's lookup finds it."""
    from models.builtin import builtin_model_dir

    llama_dir = builtin_model_dir("tiny-llama")
    m = {"model": {"path": str(llama_dir), "name": "tiny"}, "mode": "colocated",
         "pools": {"colocated": {"max_num_seqs": 4, "max_num_batched_tokens": 64}},
         "workload": {"prompt_tokens": [8, 24], "output_tokens": [4, 8]}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPLITSERVE_CACHE": str(tmp_path / "cache")}
    runs = []
    for i in range(2):
        proc = subprocess.run([sys.executable, "-m", "cluster", "profile", str(path), "--out", str(tmp_path / f"p{i}.json")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        runs.append((proc.stderr, json.loads((tmp_path / f"p{i}.json").read_text())))
    assert "profile: measured" in runs[0][0] and "profile: cached" in runs[1][0]
    assert runs[0][1] == runs[1][1]
    prof = runs[0][1]
    assert prof["samples"]["decode_shapes"] >= 3 and prof["samples"]["prefill_shapes"] >= 3
    os.environ["SPLITSERVE_CACHE"], old = str(tmp_path / "cache"), os.environ.get("SPLITSERVE_CACHE")
    try:
        assert find_cached_profile(llama_dir, "float32", 1) == prof
        assert find_cached_profile(llama_dir, "float32", 2) is None
    finally:
        if old is None:
            del os.environ["SPLITSERVE_CACHE"]
        else:
            os.environ["SPLITSERVE_CACHE"] = old
