"""What a refused request costs the server, beside the cheapest endpoint (issue 16): 300
concurrent ``GET /v1/models`` and 300 concurrent completions all refused early (the
prediction forced over the target), interleaved, from httpx clients in another process.
Prints each burst's latencies and the CPU seconds of the server process (uvicorn thread,
ingress, Ray driver) and of the client process.

    python -m benchmarks.refusal_cost --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CLIENT = r'''
import asyncio, httpx, time, json, sys, resource
url, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    lim = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(timeout=120, limits=lim) as c:
        async def one(i):
            t0 = time.monotonic()
            if path == "models":
                r = await c.get(url + "/v1/models")
            else:
                r = await c.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x " * 60, "max_tokens": 4})
            return r.status_code, time.monotonic() - t0
        t0 = time.monotonic()
        res = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"codes": sorted(set(r[0] for r in res)), "lat": sorted(r[1] for r in res), "wall": wall,
                      "client_cpu": ru.ru_utime + ru.ru_stime}))
asyncio.run(main())
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args(argv)

    import cluster  # noqa: F401 - Ray environment
    from cluster.manifest import parse_manifest
    from cluster.serve import Server, deploy, init_ray
    from models.builtin import builtin_model_dir

    started = init_ray(num_cpus=16)
    common = {"tp": 1, "num_cpus": 1, "num_kv_blocks": 256, "max_num_batched_tokens": 256}
    m = parse_manifest({"name": "refusal-cost", "model": {"path": str(builtin_model_dir("tiny-llama")), "name": "tiny"},
                        "pools": {"prefill": dict(common), "decode": dict(common)}, "kv_cache": {"block_size": 8},
                        "server": {"max_waiting_requests": 10 * a.n}})
    dep = deploy(m, timeout_s=300)
    srv = Server(dep)
    try:
        url = srv.start()
        dep.ingress.gen.predict_ttft = lambda n, unadmitted=0: 10.0  # type: ignore[method-assign] - every request refused
        for _ in range(a.rounds):
            for path in ("models", "refuse"):
                c0 = time.process_time()
                out = subprocess.run([sys.executable, "-c", CLIENT, url, path, str(a.n)], capture_output=True,
                                     text=True, check=True, timeout=600)
                server_cpu = time.process_time() - c0
                d = json.loads(out.stdout)
                lat = d["lat"]
                print(json.dumps({"burst": path, "codes": d["codes"], "p50_s": lat[len(lat) // 2], "max_s": lat[-1],
                                  "wall_s": d["wall"], "client_cpu_s": d["client_cpu"], "server_cpu_s": server_cpu,
                                  "load_avg": os.getloadavg()[0]}), flush=True)
    finally:
        srv.stop()
        dep.stop()
        if started:
            import ray

            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
