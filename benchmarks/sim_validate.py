"""Simulator vs measurement (issue 5): run the real server with `splitserve bench` at
several rates, replay the very same requests (arrival, prompt and output lengths) through
the placement simulator with coefficients profiled on this machine, and compare P50/P90
TTFT and TPOT.

    python -m benchmarks.sim_validate --json --rates 2,4,6,8 --duration 20 --out /tmp/simval
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from placement.latency import LatencyModel
from placement.simulator import ClusterSpec, Instance, SimRequest, Simulation

LAYOUTS = {
    "colocated": {"mode": "colocated", "pools": {"colocated": {"num_cpus": 1, "max_num_batched_tokens": 512,
                                                               "num_kv_blocks": 512}}},
    "1p1d": {"mode": "disaggregated", "pools": {"prefill": {"num_cpus": 1, "max_num_batched_tokens": 512,
                                                            "num_kv_blocks": 256},
                                                "decode": {"num_cpus": 1, "num_kv_blocks": 512}}},
}


def spec_for(layout: str, lat: LatencyModel, overhead: dict[str, float]) -> ClusterSpec:
    pools = LAYOUTS[layout]["pools"]
    insts = [Instance(name if name != "colocated" else "colocated", lat,
                      max_batched_tokens=int(p.get("max_num_batched_tokens", 512)),
                      kv_capacity_tokens=int(p["num_kv_blocks"]) * 16)
             for name, p in pools.items()]  # type: ignore[union-attr]
    # Same node: the KV moves through the object store (measured ~0.8 GB/s incl. scatter).
    return ClusterSpec(insts, kv_bytes_per_token=2 * 4 * 2 * 16 * 4, link_bps=lambda a, b: 0.8e9,
                       request_overhead_s=overhead["request_s"], token_overhead_s=overhead["token_s"])


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2,4,6,8")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--request-overhead-ms", type=float, default=6.5,
                    help="per-request HTTP+RPC overhead (benchmarks.overhead: client e2e minus worker)")
    ap.add_argument("--token-overhead-ms", type=float, default=1.0,
                    help="per-token streaming overhead (benchmarks.overhead: TPOT minus step)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cluster.builtin_models import builtin_model_dir
    from placement.profile import profile_engine

    prof = profile_engine(builtin_model_dir("tiny-llama"), threads=1)
    (out / "profile.json").write_text(json.dumps(prof, indent=2))
    from placement.latency import Coeffs

    lat = LatencyModel(Coeffs(*prof["prefill"]), Coeffs(*prof["decode"]))  # type: ignore[arg-type]
    overhead = {"request_s": args.request_overhead_ms / 1e3, "token_s": args.token_overhead_ms / 1e3}
    table = []
    for layout, shape in LAYOUTS.items():
        manifest = {"name": f"simval-{layout}", "model": {"builtin": "tiny-llama", "name": "demo"},
                    "kv_cache": {"block_size": 16}, **shape}
        mpath = out / f"{layout}.yaml"
        mpath.write_text(yaml.safe_dump(manifest))
        run_dir = out / layout
        r = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--manifest", str(mpath), "--rates", args.rates,
                            "--duration", str(args.duration), "--workload", "summarize", "--slo-ttft-ms", "1000",
                            "--slo-tpot-ms", "50", "--out", str(run_dir), "--no-progress", "--no-plots"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
            return 1
        rows = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
        for rate in sorted({x["rate"] for x in rows}):
            meas = [x for x in rows if x["rate"] == rate and x["ok"]]
            sim = [SimRequest(x["arrival_s"], x["prompt_tokens"], x["output_tokens"]) for x in meas]
            Simulation(spec_for(layout, lat, overhead)).run(sim)
            row = {"layout": layout, "rate": rate, "n": len(meas)}
            for metric, get_m, get_s in (("ttft", lambda x: x["ttft_s"], lambda s: s.ttft_s),
                                         ("tpot", lambda x: x["tpot_s"], lambda s: s.tpot_s)):
                m = [get_m(x) for x in meas if get_m(x) is not None]
                s = [get_s(x) for x in sim]
                for q in (50, 90):
                    mv, sv = pct(m, q), pct(s, q)
                    row[f"{metric}_p{q}_measured_ms"] = mv * 1e3
                    row[f"{metric}_p{q}_predicted_ms"] = sv * 1e3
                    row[f"{metric}_p{q}_error"] = (sv - mv) / mv if mv else float("nan")
            table.append(row)
    (out / "table.json").write_text(json.dumps(table, indent=2))
    if args.json:
        print(json.dumps({"profile": prof, "table": table}, indent=2))
    else:
        for row in table:
            print(f"{row['layout']:9s} {row['rate']:>4} " + " ".join(
                f"{k}={row[k + '_measured_ms']:.1f}/{row[k + '_predicted_ms']:.1f}ms({row[k + '_error']:+.0%})"
                for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
