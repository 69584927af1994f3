"""Run as a script (its own Ray cluster of fake nodes): prefill on 127.0.0.2, decode on
127.0.0.3, KV over gRPC with the lossless codec; then a planned layout, a tp=2 worker
and two unplaceable pools, to check placement groups. Prints one JSON line with what it
saw; exits non-zero on failure.

    python -m tests.integration.multinode_check MODEL_DIR
"""

from __future__ import annotations

import json
import sys

import cluster  # noqa: F401 - Ray environment
import ray
from ray.cluster_utils import Cluster


def _actors_on_nodes() -> dict[str, list[str]]:
    """Alive actors by class name: the node IPs they run on (GCS actor table)."""
    import ray._private.state as state

    ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    out: dict[str, list[str]] = {}
    for a in state.actors().values():
        if a["State"] == "ALIVE":
            out.setdefault(a["ActorClassName"], []).append(ip_of.get(a["Address"]["NodeID"], "?"))
    return out


def _pg_node(pg_id: str) -> list[str]:
    """Node IP of each bundle of a placement group."""
    ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    table = ray.util.placement_group_table().get(pg_id, {})
    return sorted({ip_of.get(n, "?") for n in table.get("bundles_to_node_id", {}).values()})


def _pg_states() -> dict[str, str]:
    return {pg_id: t["state"] for pg_id, t in ray.util.placement_group_table().items()}


def _placement(state: dict) -> dict[str, list[dict[str, object]]]:
    """Per pool, per worker: the node it reports, the node the plan named, the placement
    group the controller made for it, the group the worker says it runs in, and the
    node(s) Ray placed that group's bundles on."""
    return {p: [{"node_ip": w["node_ip"], "planned_node": w["planned_node"], "pg": w["placement_group"],
                 "worker_pg": w["stats"].get("placement_group"), "pg_nodes": _pg_node(w["placement_group"])}
                for w in ws]
            for p, ws in state["pools"].items()}


def check_planned_placement() -> dict[str, object]:
    """`splitserve plan` on the example CPU manifest, then deploy the plan here: every
    worker must run on the node the plan names, inside its own placement group; a replaced
    worker gets a new group (the old one removed), and teardown removes them all."""
    import subprocess
    import tempfile
    import time
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
    out: dict[str, object] = {"mode": m.mode, "want": {k: sorted(v) for k, v in want.items()}}
    try:
        state = ray.get(dep.controller.get_state.remote())
        out["got"] = {p: sorted(w["node_ip"] for w in ws) for p, ws in state["pools"].items()}
        out["workers"] = _placement(state)
        # Replace one worker: the controller must give the new one a new group on the same
        # node and remove the old group.
        victim = next(w for ws in state["pools"].values() for w in ws)
        ray.kill(victim["handle"], no_restart=True)
        deadline = time.monotonic() + 120
        new = None
        while time.monotonic() < deadline:
            st = ray.get(dep.controller.get_state.remote())
            new = next((w for ws in st["pools"].values() for w in ws
                        if w["worker_id"] not in {x["worker_id"] for xs in state["pools"].values() for x in xs}), None)
            if new is not None:
                break
            time.sleep(0.5)
        states = _pg_states()
        out["replaced"] = {"old_pg_state": states.get(victim["placement_group"]),
                           "new": None if new is None else {
                               "node_ip": new["node_ip"], "planned_node": new["planned_node"],
                               "same_planned_node": new["planned_node"] == victim["planned_node"],
                               "pg_state": states.get(new["placement_group"]),
                               "worker_pg": new["stats"].get("placement_group") == new["placement_group"],
                               "pg_nodes": _pg_node(new["placement_group"])}}
        pgs = [w["placement_group"] for ws in ray.get(dep.controller.get_state.remote())["pools"].values()
               for w in ws]
    finally:
        dep.stop()
    states = _pg_states()
    out["after_stop"] = sorted({states.get(pg, "missing") for pg in pgs})
    return out


def check_tp_group() -> dict[str, object]:
    """A tp=2 worker on a named node: one placement group of two bundles holding the
    worker (rank 0) and its TP rank, both on that node."""
    from cluster.manifest import parse_manifest
    from cluster.serve import deploy

    m = parse_manifest({"name": "tpgroup", "model": {"builtin": "tiny-llama", "name": "tiny"}, "mode": "colocated",
                        "pools": {"colocated": {"tp": 2, "num_cpus": 1, "nodes": ["127.0.0.3"], "num_kv_blocks": 64}}})
    dep = deploy(m)
    try:
        state = ray.get(dep.controller.get_state.remote())
        w = state["pools"]["colocated"][0]
        table = ray.util.placement_group_table()[w["placement_group"]]
        # The node has 2 CPUs and the group holds both: the TP rank could not have been
        # scheduled outside it.
        return {"bundles": len(table["bundles"]), "strategy": table["strategy"],
                "worker_in_pg": w["stats"].get("placement_group") == w["placement_group"],
                "pg_nodes": _pg_node(w["placement_group"]), "actors": _actors_on_nodes()}
    finally:
        dep.stop()


def check_placement_errors() -> dict[str, object]:
    """A node that is not there, and a node without the CPUs: a clear error, in time."""
    import time

    from cluster.manifest import parse_manifest
    from cluster.serve import deploy
    from placement.groups import PlacementGroupError

    out: dict[str, object] = {}
    for case, pool in (("missing_node", {"nodes": ["127.0.0.9"], "num_cpus": 1}),
                       ("too_few_cpus", {"nodes": ["127.0.0.2"], "num_cpus": 3})):
        m = parse_manifest({"name": f"bad-{case}", "model": {"builtin": "tiny-llama", "name": "tiny"},
                            "mode": "colocated", "pools": {"colocated": pool},
                            "hardware": {"gpu": "cpu", "placement_timeout_s": 3}})
        t0 = time.monotonic()
        try:
            dep = deploy(m)
        except PlacementGroupError as e:
            out[case] = {"error": str(e), "seconds": time.monotonic() - t0}
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            out[case] = {"other": f"{type(e).__name__}: {e}"}
        else:
            dep.stop()
            out[case] = {"other": "deployed"}
    out["leftover_pgs"] = sorted(t["state"] for t in ray.util.placement_group_table().values()
                                 if t["name"].startswith("splitserve-") and t["state"] != "REMOVED")
    return out


def check_node_loss(c: Cluster, model_dir: str) -> dict[str, object]:
    """A fake node is removed while a closed loop of greedy requests runs: its workers are
    re-placed (new placement groups) on the surviving nodes and every request completes
    with the output it has without the fault."""
    import threading
    import time

    import httpx

    from cluster.manifest import parse_manifest
    from cluster.serve import Server, deploy

    m = parse_manifest({
        "name": "nodeloss", "model": {"path": model_dir, "name": "tiny"}, "mode": "disaggregated",
        "pools": {"prefill": {"num_cpus": 1, "num_kv_blocks": 128}, "decode": {"num_cpus": 1, "num_kv_blocks": 128}},
        "kv_cache": {"block_size": 8}, "kv_transfer": {"codec": "none"},
        "server": {"request_timeout_s": 120, "token_timeout_s": 30, "health_check_period_s": 0.5,
                   "ttft_admission": False}})
    dep = deploy(m)
    server = Server(dep)
    url = server.start()
    out: dict[str, object] = {}
    try:
        state = ray.get(dep.controller.get_state.remote())
        placed = {p: [w["node_ip"] for w in ws] for p, ws in state["pools"].items()}
        # A node other than the head's (the driver, ingress and controller) that runs a worker.
        out["controller_on"] = _actors_on_nodes().get("Controller")
        victim_ip = next(ip for ws in placed.values() for ip in ws if ip != "127.0.0.1")
        node = next(n for n in c.worker_nodes if n.node_ip_address == victim_ip)
        prompts = [" ".join(f"n{i}_{j} = {j}" for j in range(10 + 6 * i)) for i in range(3)]
        body = {"model": "tiny", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        expected = {p: httpx.post(f"{url}/v1/completions", timeout=120, json={**body, "prompt": p}
                                  ).json()["choices"][0]["text"] for p in prompts}
        results: list[tuple[str, int, str]] = []
        stop = threading.Event()

        def loop(k: int) -> None:
            i = k
            while not stop.is_set():
                p = prompts[i % len(prompts)]
                try:
                    r = httpx.post(f"{url}/v1/completions", timeout=180, json={**body, "prompt": p})
                    results.append((p, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200
                                    else r.text[:200]))
                except Exception as e:  # noqa: BLE001 - reported
                    results.append((p, -1, repr(e)[:200]))
                i += 1

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 120
            while len(results) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            c.remove_node(node)
            at = len(results)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                ws = ray.get(dep.controller.get_state.remote())["pools"]
                if (all(w["healthy"] and w["node_ip"] != victim_ip for p in ws for w in ws[p])
                        and all(len(ws[p]) == 1 for p in ws) and len(results) >= at + 4):
                    break
                time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=240)
        state = ray.get(dep.controller.get_state.remote())
        out = {"removed": victim_ip, "placed_before": placed, "controller_on": out["controller_on"],
               "placed_after": {p: [w["node_ip"] for w in ws if w["healthy"]] for p, ws in state["pools"].items()},
               "requests": len(results), "after_removal": len(results) - at,
               "failed": [(s, t) for _, s, t in results if s != 200],
               "changed": sum(1 for p, s, t in results if s == 200 and t != expected[p])}
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["error"] = repr(e)[:500]
    finally:
        server.stop()
        dep.stop()
    return out


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
            body = {"model": "tiny", "prompt": prompts[1], "max_tokens": 5, "ignore_eos": True,
                    "temperature": 0}
            for kind in ("corrupt", "cut"):
                ray.get(prefill.inject_kv_fault.remote(kind, 2))  # the receiver retries once
                # The transfer fails twice: the decode worker computes the prompt itself.
                r = httpx.post(f"{url}/v1/completions", timeout=60, json=body)
                ok = httpx.post(f"{url}/v1/completions", timeout=60, json=body)
                faults[kind] = [r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text[:200],
                                ok.status_code, ok.json()["choices"][0]["text"] if ok.status_code == 200 else ok.text[:200]]
            out["faults"] = faults
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            out["reroutes"] = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                               if line.startswith("splitserve_request_reroutes_total{")}
            out["kv_bytes"] = float(next(line.split()[-1] for line in metrics.splitlines()
                                         if line.startswith("splitserve_kv_transfer_bytes_total")))
            out["transfers"] = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                                if line.startswith("splitserve_kv_transfers_total{")}
        finally:
            server.stop()
            dep.stop()
        out["plan"] = check_planned_placement()
        out["tp_group"] = check_tp_group()
        out["placement_errors"] = check_placement_errors()
        # A fourth node, so that the workers of a lost node have somewhere to go.
        c.add_node(num_cpus=2, node_ip_address="127.0.0.4")
        c.wait_for_nodes()
        out["node_loss"] = check_node_loss(c, model_dir)
    finally:
        ray.shutdown()
        c.shutdown()
    print(json.dumps(out))
    return 0 if out.get("equal") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
