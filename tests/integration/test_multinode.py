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


def test_kv_faults_end_request_with_503_and_server_keeps_serving(seen):
    assert seen["faults"]["corrupt"][0] == 503 and "checksum" in seen["faults"]["corrupt"][1]
    assert seen["faults"]["cut"][0] == 503 and "KV" in seen["faults"]["cut"][1]
    assert seen["faults"]["corrupt"][2] == 200 and seen["faults"]["cut"][2] == 200


def test_planned_layout_is_placed_where_the_plan_says(seen):
    plan = seen["plan"]
    assert "error" not in plan, plan
    assert plan["want"] and plan["got"] == plan["want"], plan
