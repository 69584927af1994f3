"""Dispatch of single-token requests while 4 streams decode (the decode engine thread busy):
the yield's effect on arrivals under load. Run from a tree's root with PYTHONPATH=that tree."""
import json, multiprocessing, os, statistics, sys, time
from concurrent.futures import ProcessPoolExecutor

def main():
    import cluster  # noqa
    import ray
    from cluster.manifest import load_manifest
    from cluster.serve import Server, deploy, init_ray
    from benchmarks.overhead import _tpot_round, ingress_overhead_in_process
    m = load_manifest("deploy/manifests/demo.yaml")
    m.server.ttft_admission = False
    init_ray(num_cpus=4)
    dep = deploy(m); srv = Server(dep); url = srv.start()
    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    out = {"load_start": os.getloadavg()[0]}
    try:
        pool.submit(ingress_overhead_in_process, url, 5).result(timeout=300)  # warm-up
        pool.submit(_tpot_round, url, 8, 4).result(timeout=300)
        res = {"dispatch": [], "outside": [], "tpot": []}
        for rnd in range(2):
            bg = pool.submit(_tpot_round, url, 300, 4)
            time.sleep(2.0)  # streams decoding
            o = pool.submit(ingress_overhead_in_process, url, 40).result(timeout=300)
            res["dispatch"] += [a + b for a, b in zip(o["ingress"], o["rpc"])]
            res["outside"] += o["outside"]
            res["tpot"].append(bg.result(timeout=600))
        out.update({"dispatch_p50_ms": statistics.median(res["dispatch"]) * 1e3,
                    "dispatch_p90_ms": sorted(res["dispatch"])[int(0.9 * len(res["dispatch"]))] * 1e3,
                    "client_e2e_minus_worker_p50_ms": statistics.median(res["outside"]) * 1e3,
                    "background_tpot_ms": [t * 1e3 for t in res["tpot"]], "load_end": os.getloadavg()[0]})
    finally:
        pool.shutdown(); srv.stop(); dep.stop(); ray.shutdown()
    print(json.dumps(out))

if __name__ == "__main__":
    main()
