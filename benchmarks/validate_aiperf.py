"""Cross-check `splitserve bench` against an independent load tool, NVIDIA AIPerf, on the
same server with the very same requests at the very same times.

One synthetic workload (seeded Poisson arrivals, token-id prompts) is written twice: as a
bench trace (JSONL: arrival_s, prompt, output_tokens) and as an AIPerf mooncake trace
whose `payload` is the exact request body and `timestamp` the send time (AIPerf replays it
with --fixed-schedule). The two tools then run one after the other, in the order
A B B A (bench, aiperf, aiperf, bench) so that drift on a shared machine falls on both,
and the script prints TTFT and TPOT (AIPerf's inter_token_latency: the same
(e2e - ttft) / (tokens - 1)) per run and pooled, with the relative differences.

AIPerf installs heavy dependencies: keep it in its own venv, never in the project's.

    python -m benchmarks.validate_aiperf --url http://127.0.0.1:8123 --aiperf /tmp/loadtool-venv/bin/aiperf \\
        --tokenizer ~/.cache/splitserve/builtin/tiny-llama-v1 --rate 2 --duration 30 \\
        --prompt-tokens 512 --output-tokens 64 --out /tmp/validate --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.workload import Workload, parse_length, synthetic


def write_traces(out: Path, model: str, rate: float, duration_s: float, prompt: str, output: str,
                 seed: int) -> int:
    specs = synthetic(Workload("validate", parse_length(prompt, "--prompt-tokens"),
                               parse_length(output, "--output-tokens")), rate, duration_s, seed)
    with (out / "bench_trace.jsonl").open("w") as a, (out / "aiperf_trace.jsonl").open("w") as b:
        for s in specs:
            a.write(json.dumps({"arrival_s": s.arrival_s, "prompt": s.prompt,
                                "output_tokens": s.output_tokens}) + "\n")
            payload = {"model": model, "prompt": s.prompt, "max_tokens": s.output_tokens, "stream": True,
                       "stream_options": {"include_usage": True}, "temperature": 0.0, "ignore_eos": True}
            b.write(json.dumps({"timestamp": int(round(s.arrival_s * 1000)), "payload": payload}) + "\n")
    return len(specs)


def run_bench(url: str, out: Path, duration_s: float) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "benchmarks.bench", "--url", url, "--trace", str(out.parent / "bench_trace.jsonl"),
           "--duration", str(duration_s + 1), "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100",
           "--out", str(out), "--no-progress", "--no-plots", "--warmup", "2"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration_s + 300)
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    ok = [r for r in recs if r["ok"]]
    return {"ttft_ms": [r["ttft_s"] * 1e3 for r in ok], "tpot_ms": [r["tpot_s"] * 1e3 for r in ok],
            "e2e_ms": [r["e2e_s"] * 1e3 for r in ok], "failed": [float(len(recs) - len(ok))]}


def run_aiperf(aiperf: str, url: str, model: str, tokenizer: str, out: Path,
               duration_s: float) -> dict[str, list[float]]:
    cmd = [aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "completions",
           "--streaming", "--input-file", str(out.parent / "aiperf_trace.jsonl"),
           "--custom-dataset-type", "mooncake_trace", "--fixed-schedule", "--tokenizer", tokenizer,
           "--use-server-token-count", "--ui", "none", "--artifact-dir", str(out), "--no-gpu-telemetry",
           "--workers-max", "1", "--record-processors", "1", "--request-timeout-seconds", "60"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration_s + 300)
    vals: dict[str, list[float]] = {"ttft_ms": [], "tpot_ms": [], "e2e_ms": [], "failed": [0.0]}
    for line in (out / "profile_export.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["metadata"].get("benchmark_phase") != "profiling":
            continue
        m = rec.get("metrics") or {}
        if rec.get("error") or "time_to_first_token" not in m:
            vals["failed"][0] += 1
            continue
        vals["ttft_ms"].append(m["time_to_first_token"]["value"])
        vals["tpot_ms"].append(m["inter_token_latency"]["value"])
        vals["e2e_ms"].append(m["request_latency"]["value"])
    return vals


def stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--aiperf", required=True, help="path of the aiperf executable (its own venv)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory of the served model")
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--prompt-tokens", default="512")
    p.add_argument("--output-tokens", default="64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", default="ABBA", help="A = bench, B = aiperf")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = httpx.get(f"{a.url}/v1/models", timeout=10).json()["data"][0]["id"]
    n = write_traces(out, model, a.rate, a.duration, a.prompt_tokens, a.output_tokens, a.seed)
    print(f"{n} requests at {a.rate}/s over {a.duration}s, order {a.order}", file=sys.stderr)
    pooled: dict[str, dict[str, list[float]]] = {"bench": {}, "aiperf": {}}
    runs = []
    for i, who in enumerate(a.order):
        d = out / f"run{i}-{who}"
        tool = "bench" if who == "A" else "aiperf"
        vals = (run_bench(a.url, d, a.duration) if who == "A"
                else run_aiperf(a.aiperf, a.url, model, a.tokenizer, d, a.duration))
        runs.append({"run": i, "tool": tool, "failed": vals["failed"][0],
                     **{k: stats(v) for k, v in vals.items() if k != "failed"}})
        for k, v in vals.items():
            pooled[tool].setdefault(k, []).extend(v)
        r = runs[-1]
        print(f"run {i} {tool:6s}: TTFT mean/p50/p90 {r['ttft_ms']['mean']:.2f}/{r['ttft_ms']['p50']:.2f}/"
              f"{r['ttft_ms']['p90']:.2f} ms  TPOT {r['tpot_ms']['mean']:.3f}/{r['tpot_ms']['p50']:.3f}/"
              f"{r['tpot_ms']['p90']:.3f} ms  n={r['ttft_ms']['n']} failed={r['failed']:.0f}", file=sys.stderr)
    result: dict[str, Any] = {"runs": runs, "pooled": {}}
    for tool in pooled:
        result["pooled"][tool] = {k: stats(v) for k, v in pooled[tool].items() if k != "failed"}
    diff = {}
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for s in ("mean", "p50", "p90"):
            b, x = result["pooled"]["bench"][metric][s], result["pooled"]["aiperf"][metric][s]
            diff[f"{metric}.{s}"] = (b - x) / x
    result["relative_difference_bench_vs_aiperf"] = diff
    for k, v in diff.items():
        print(f"  {k:14s} bench {result['pooled']['bench'][k.split('.')[0]][k.split('.')[1]]:9.3f}  "
              f"aiperf {result['pooled']['aiperf'][k.split('.')[0]][k.split('.')[1]]:9.3f}  "
              f"diff {v:+.1%}", file=sys.stderr)
    (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    if a.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
