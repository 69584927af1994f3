"""Driver for test_fake_autoscaler.py (its own process: it joins the fake autoscaling
cluster, not the test session's Ray). Serves a manifest whose decode pool autoscales onto a
node the cluster does not have yet; prints one JSON object with what it saw."""

from __future__ import annotations

import json
import sys
import time

import cluster  # noqa: F401 - Ray's environment
import httpx
import openai
import ray

from cluster.manifest import parse_manifest
from cluster.serve import Server, deploy


def alive() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def replicas(url: str, pool: str) -> int:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'splitserve_pool_replicas{{pool="{pool}"}}'):
            return int(float(line.split()[-1]))
    return 0


def main(address: str) -> None:
    ray.init(address=address, namespace="splitserve-fake", log_to_driver=False)
    m = parse_manifest({
        "name": "fake-autoscale", "model": {"builtin": "tiny-llama", "name": "tiny"},
        "pools": {"prefill": {"num_cpus": 1, "num_kv_blocks": 128},
                  "decode": {"num_cpus": 1, "num_kv_blocks": 128,
                             "autoscaling": {"min_replicas": 1, "max_replicas": 2, "interval_s": 1,
                                             "cooldown_s": 5}}},
        "kv_cache": {"block_size": 8},
        # Every decode step misses a 1 us TPOT target: the decode pool wants a second replica.
        "slo": {"ttft_ms": 1000, "tpot_ms": 0.001, "attainment": 0.9},
        "hardware": {"placement_timeout_s": 240},
        "server": {"health_check_period_s": 0.5},
    })
    out: dict[str, object] = {"nodes_before": alive()}
    dep = deploy(m, timeout_s=300)
    server = Server(dep)
    try:
        url = server.start()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0)
        failed = 0
        sent = 0
        deadline = time.monotonic() + 400
        while replicas(url, "decode") < 2 and time.monotonic() < deadline:
            try:
                r = client.completions.create(model="tiny", prompt=f"step {sent}", max_tokens=12, temperature=0)
                assert r.usage is not None and r.usage.completion_tokens >= 1
            except Exception:  # noqa: BLE001 - counted
                failed += 1
            sent += 1
            time.sleep(0.2)
        out["decode_replicas_up"] = replicas(url, "decode")
        out["nodes_up"] = alive()
        # Load over: the pool shrinks, then the autoscaler removes the idle fake node.
        deadline = time.monotonic() + 300
        while replicas(url, "decode") > 1 and time.monotonic() < deadline:
            time.sleep(1)
        out["decode_replicas_down"] = replicas(url, "decode")
        deadline = time.monotonic() + 300
        while len(alive()) > len(out["nodes_before"]) and time.monotonic() < deadline:  # type: ignore[arg-type]
            time.sleep(2)
        out["nodes_after"] = alive()
        out["sent"], out["failed"] = sent, failed
        unf = [x for x in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
               if x.startswith("splitserve_autoscale_unfulfilled_total")]
        out["unfulfilled"] = unf
    finally:
        server.stop()
        dep.stop()
        print(json.dumps(out), flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
