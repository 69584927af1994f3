"""Fake multi-node cluster (its own Ray, run in a subprocess): prefill on 127.0.0.2,
decode on 127.0.0.3 with KV over gRPC; injected transfer faults; and a planned layout
placed where the plan says."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def seen(llama_dir):
    r = subprocess.run([sys.executable, "-m", "tests.integration.multinode_check", str(llama_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.stdout.strip(), r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["returncode"] = r.returncode
    return out


def test_cross_node_grpc_matches_engine(seen):
    assert seen["nodes"] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert seen["placed"] == {"prefill": ["127.0.0.2"], "decode": ["127.0.0.3"]}
    assert seen["equal"] is True and seen["kv_bytes"] > 0 and seen["returncode"] == 0
    assert seen["transfers"]["grpc"] >= 3


def test_kv_faults_are_recomputed_and_server_keeps_serving(seen):
    """A KV stream corrupted or cut twice (the receiver's own retry included): the decode
    worker computes the prompt itself and the request completes with the same greedy text."""
    for kind in ("corrupt", "cut"):
        status, text, next_status, next_text = seen["faults"][kind]
        assert status == 200 and next_status == 200, seen["faults"]
        assert text == next_text, (kind, text, next_text)
    assert seen["reroutes"].get("decode", 0) >= 2, seen["reroutes"]


def test_node_loss_replaces_workers_and_loses_nothing(seen):
    """A fake node removed while serving: its workers come back on surviving nodes and every
    request of the closed loop completes unchanged."""
    nl = seen["node_loss"]
    assert "error" not in nl, nl
    # The controller runs on the deploying (head) node, so losing a worker node cannot take it.
    assert nl["controller_on"] == ["127.0.0.1"], nl
    assert nl["removed"] not in [ip for ips in nl["placed_after"].values() for ip in ips], nl
    assert all(len(ips) == 1 for ips in nl["placed_after"].values()), nl
    assert not nl["failed"] and nl["changed"] == 0 and nl["after_removal"] >= 4, nl


def test_planned_layout_is_placed_where_the_plan_says(seen):
    plan = seen["plan"]
    assert "error" not in plan, plan
    assert plan["want"] and plan["got"] == plan["want"], plan
    # Every worker runs in its own placement group, on the node the plan names.
    pgs = set()
    for pool, workers in plan["workers"].items():
        for w in workers:
            assert w["planned_node"] and w["node_ip"] == w["planned_node"], (pool, w)
            assert w["pg"] and w["pg"] not in pgs, (pool, w)
            pgs.add(w["pg"])
            assert w["worker_pg"] == w["pg"] and w["pg_nodes"] == [w["planned_node"]], (pool, w)


def test_replaced_worker_gets_a_new_group_and_teardown_removes_all(seen):
    rep = seen["plan"]["replaced"]
    assert rep["old_pg_state"] == "REMOVED", rep
    new = rep["new"]
    assert new and new["same_planned_node"] and new["node_ip"] == new["planned_node"], rep
    assert new["pg_state"] == "CREATED" and new["worker_pg"] and new["pg_nodes"] == [new["planned_node"]]
    assert seen["plan"]["after_stop"] == ["REMOVED"], seen["plan"]


def test_tp_ranks_share_the_worker_group_on_its_node(seen):
    tp = seen["tp_group"]
    assert tp["bundles"] == 2 and tp["strategy"] == "STRICT_PACK", tp
    assert tp["worker_in_pg"] and tp["pg_nodes"] == ["127.0.0.3"], tp
    assert tp["actors"]["ColocatedWorker"] == ["127.0.0.3"] and tp["actors"]["TPRank"] == ["127.0.0.3"], tp


def test_unplaceable_pool_fails_in_time_naming_pool_node_resources(seen):
    errs = seen["placement_errors"]
    missing, cpus = errs["missing_node"], errs["too_few_cpus"]
    assert "error" in missing and "error" in cpus, errs
    assert "pools.colocated" in missing["error"] and "127.0.0.9" in missing["error"], missing
    assert "not an alive Ray node" in missing["error"], missing
    assert "127.0.0.2" in cpus["error"] and "'CPU': 3.0" in cpus["error"], cpus
    assert missing["seconds"] < 30 and cpus["seconds"] < 30, errs
    assert errs["leftover_pgs"] == [], errs
