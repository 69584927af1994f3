"""Prefill and decode on two fake nodes: KV crosses over gRPC, output equals the engine."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cross_node_grpc_matches_engine(llama_dir):
    r = subprocess.run([sys.executable, "-m", "tests.integration.multinode_check", str(llama_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert seen["placed"] == {"prefill": ["127.0.0.2"], "decode": ["127.0.0.3"]}
    assert seen["equal"] is True and seen["kv_bytes"] > 0
    assert seen["transfers"]["grpc"] >= 3
    assert seen["faults"]["corrupt"][0] == 503 and "checksum" in seen["faults"]["corrupt"][1]
    assert seen["faults"]["cut"][0] == 503 and "KV" in seen["faults"]["cut"][1]
    assert seen["faults"]["corrupt"][2] == 200 and seen["faults"]["cut"][2] == 200
