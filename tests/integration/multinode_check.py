"""Run as a script (its own Ray cluster of fake nodes): prefill on 127.0.0.2, decode on
127.0.0.3, KV over gRPC with the lossless codec. Prints one JSON line with what it saw; exits non-zero on failure.

    python -m tests.integration.multinode_check MODEL_DIR
"""

from __future__ import annotations

import json
import sys

import cluster  # noqa: F401 - Ray environment
import ray
from ray.cluster_utils import Cluster


def check_planned_placement() -> dict[str, object]:
    """`splitserve plan` on the example CPU manifest, then deploy the plan here: every
    worker must run on the node the plan names."""
    import subprocess
    import tempfile
    from pathlib import Path

    from cluster.manifest import load_manifest
    from cluster.serve import deploy

    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        planned = Path(tmp) / "planned.yaml"
        r = subprocess.run([sys.executable, "-m", "cluster", "plan", "deploy/manifests/plan-cpu-3node.yaml",
                            "--out", str(planned)], cwd=root, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return {"error": r.stdout + r.stderr}
        m = load_manifest(planned)
    want = {name: list(pool.nodes or []) for name, pool in m.pools.items()}
    dep = deploy(m)
    try:
        state = ray.get(dep.controller.get_state.remote())
        got = {p: sorted(w["node_ip"] for w in ws) for p, ws in state["pools"].items()}
    finally:
        dep.stop()
    return {"mode": m.mode, "want": {k: sorted(v) for k, v in want.items()}, "got": got}


def main(model_dir: str) -> int:
    import httpx

    from cluster.manifest import parse_manifest
    from cluster.serve import Server, deploy
    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=2, node_ip_address="127.0.0.2")
    c.add_node(num_cpus=2, node_ip_address="127.0.0.3")
    ray.init(address=c.address, namespace="splitserve-multinode", log_to_driver=False)
    out: dict[str, object] = {"nodes": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])}
    try:
        m = parse_manifest({
            "name": "multinode", "model": {"path": model_dir, "name": "tiny"}, "mode": "disaggregated",
            "pools": {"prefill": {"num_cpus": 1, "nodes": ["127.0.0.2"], "num_kv_blocks": 128},
                      "decode": {"num_cpus": 1, "nodes": ["127.0.0.3"], "num_kv_blocks": 128}},
            "kv_cache": {"block_size": 8}, "kv_transfer": {"codec": "lossless"},
            "server": {"request_timeout_s": 60, "token_timeout_s": 20}})
        dep = deploy(m)
        server = Server(dep)
        url = server.start()
        try:
            state = ray.get(dep.controller.get_state.remote())
            out["placed"] = {p: [w["node_ip"] for w in ws] for p, ws in state["pools"].items()}
            prompts = [list(range(3, 3 + n)) for n in (5, 17, 40)]
            got = []
            for p in prompts:
                r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": p, "max_tokens": 10, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True})
                r.raise_for_status()
                got.append(r.json()["choices"][0]["token_ids"])
            eng = LLMEngine.from_model_dir(model_dir, num_blocks=64, block_size=8,
                                           scheduler_config=SchedulerConfig(max_model_len=8192))
            want = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
            out["equal"] = got == want
            # Injected transfer faults end the request with a clear 503, and the next
            # request is served.
            prefill = ray.get(dep.controller.get_state.remote())["pools"]["prefill"][0]["handle"]
            faults = {}
            for kind in ("corrupt", "cut"):
                ray.get(prefill.inject_kv_fault.remote(kind, 2))  # the receiver retries once
                r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": prompts[1], "max_tokens": 5, "ignore_eos": True})
                ok = httpx.post(f"{url}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": prompts[1], "max_tokens": 5, "ignore_eos": True})
                faults[kind] = [r.status_code, r.json()["error"]["message"][:120], ok.status_code]
            out["faults"] = faults
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            out["kv_bytes"] = float(next(line.split()[-1] for line in metrics.splitlines()
                                         if line.startswith("splitserve_kv_transfer_bytes_total")))
            out["transfers"] = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                                if line.startswith("splitserve_kv_transfers_total{")}
        finally:
            server.stop()
            dep.stop()
        out["plan"] = check_planned_placement()
    finally:
        ray.shutdown()
        c.shutdown()
    print(json.dumps(out))
    return 0 if out.get("equal") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
