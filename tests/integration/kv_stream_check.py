"""Run as a script (its own Ray cluster of fake nodes): streamed KV between a prefill
worker on 127.0.0.2 and a decode worker on 127.0.0.3 over a paced gRPC link. Prints one
JSON line with what it saw.

    python -m tests.integration.kv_stream_check MODEL_DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cluster  # noqa: F401 - Ray environment
import ray
from ray.cluster_utils import Cluster

URL_TIMEOUT = 60


def spec(model_dir: str, kv: dict) -> dict:
    return {"name": "kvstream", "model": {"path": model_dir, "name": "tiny"}, "mode": "disaggregated",
            "pools": {"prefill": {"num_cpus": 1, "nodes": ["127.0.0.2"], "num_kv_blocks": 512,
                                  "max_num_batched_tokens": 256},
                      "decode": {"num_cpus": 1, "nodes": ["127.0.0.3"], "num_kv_blocks": 512}},
            "kv_cache": {"block_size": 8}, "kv_transfer": {"chunk_tokens": 16, "timeout_s": 8, **kv},
            "server": {"request_timeout_s": 60, "token_timeout_s": 20},
            "slo": {"ttft_ms": 300, "tpot_ms": 100}}


def complete(url: str, p: list[int], n: int = 8) -> tuple[int, dict]:
    import httpx

    r = httpx.post(f"{url}/v1/completions", timeout=URL_TIMEOUT, json={
        "model": "tiny", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True})
    return r.status_code, r.json()


def metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name))


def main(model_dir: str) -> int:
    from cluster.manifest import parse_manifest
    from cluster.serve import Server, deploy
    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=2, node_ip_address="127.0.0.2")
    c.add_node(num_cpus=2, node_ip_address="127.0.0.3")
    ray.init(address=c.address, namespace="splitserve-kvstream", log_to_driver=False)
    out: dict[str, object] = {}
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40, 100, 23, 64)]
    eng = LLMEngine.from_model_dir(model_dir, num_blocks=128, block_size=8,
                                   scheduler_config=SchedulerConfig(max_model_len=8192))
    want = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    try:
        # 1. Raw KV, streamed layer by layer over a link paced to 10 Mbit/s, concurrent
        # requests of several chunk counts: greedy output equals the engine alone.
        dep = deploy(parse_manifest(spec(model_dir, {"codec": "none", "rate_limit_gbps": 0.01})))
        server = Server(dep)
        url = server.start()
        try:
            with ThreadPoolExecutor(6) as ex:
                got = list(ex.map(lambda p: complete(url, p), prompts))
            out["statuses"] = [s for s, _ in got]
            out["equal"] = [b.get("choices", [{}])[0].get("token_ids") for _, b in got] == want
            out["grpc_bytes"] = metric(url, "splitserve_kv_transfer_bytes_total")
            out["raw_bytes"] = metric(url, "splitserve_kv_transfer_raw_bytes_total")
            prefill = ray.get(dep.controller.get_state.remote())["pools"]["prefill"][0]["handle"]
            # 2. Faults: one corrupted stream is fetched again (same output); two in a row,
            # or a cut stream twice: the decode worker computes the prompt itself (same
            # output); the next request is served.
            faults: dict[str, list] = {}
            for kind, count in (("corrupt", 1), ("corrupt", 2), ("cut", 2)):
                ray.get(prefill.inject_kv_fault.remote(kind, count))
                t0 = time.monotonic()
                status, body = complete(url, prompts[2])
                took = time.monotonic() - t0
                ok, after = complete(url, prompts[1])
                faults[f"{kind}x{count}"] = [status, (body.get("error") or {}).get("message", "")[:200],
                                             body.get("choices", [{}])[0].get("token_ids") == want[2],
                                             round(took, 2), ok]
            out["faults"] = faults
            # 3. The receiver dies while a long prompt's KV is in flight (3000 tokens =
            # 3 MB, ~2.4 s at 10 Mbit/s): the controller replaces the decode worker, the
            # request resumes there (computing the prompt), later requests succeed.
            decode = ray.get(dep.controller.get_state.remote())["pools"]["decode"][0]["handle"]
            res: dict[str, object] = {}

            def long_request() -> None:
                t0 = time.monotonic()
                res["status"], body = complete(url, [i % 1000 + 3 for i in range(3000)], n=4)
                res["took"] = round(time.monotonic() - t0, 2)
                res["message"] = (body.get("error") or {}).get("message", "")[:200]
                res["tokens"] = len(body.get("choices", [{}])[0].get("token_ids") or [])

            th = threading.Thread(target=long_request)
            th.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not ray.get(decode.health.remote())["kv_in_flight"]:
                time.sleep(0.05)  # poll: kill once the KV is on its way
            res["in_flight"] = time.monotonic() < deadline
            ray.kill(decode, no_restart=True)
            th.join(timeout=90)
            recovered = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                s, b = complete(url, prompts[0])
                if s == 200:
                    recovered = b["choices"][0]["token_ids"] == want[0]
                    break
                time.sleep(0.5)
            res["recovered"] = recovered
            out["killed_receiver"] = res
        finally:
            server.stop()
            dep.stop()
        # 4. Adaptive over a slow link with a tight budget: the plan compresses, fewer
        # bytes cross than raw, and requests still complete.
        dep = deploy(parse_manifest(spec(model_dir, {"codec": "adaptive", "rate_limit_gbps": 0.002,
                                                     "budget_ms": 300})))
        server = Server(dep)
        url = server.start()
        try:
            statuses = [complete(url, p)[0] for p in prompts[2:4] + [list(range(5, 405))]]
            prefill = ray.get(dep.controller.get_state.remote())["pools"]["prefill"][0]["handle"]
            out["adaptive"] = {"statuses": statuses,
                               "bytes_ratio": metric(url, "splitserve_kv_transfer_bytes_total")
                               / max(1.0, metric(url, "splitserve_kv_transfer_raw_bytes_total")),
                               "policy": ray.get(prefill.kv_policy.remote())}
        finally:
            server.stop()
            dep.stop()
    finally:
        ray.shutdown()
        c.shutdown()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
