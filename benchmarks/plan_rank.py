"""Plan fidelity that survives a noisy machine (issue 15, item 6): rank layouts that fit this
machine by the placement model's predicted goodput, then measure them interleaved and
compare the order and the goodput ratios, not absolute latencies.

1. Profile the engine through the CLI (`splitserve profile`, cached under
   ~/.cache/splitserve/profiles): one thread, and two threads for a layout whose worker
   has two CPUs.
2. Predict: every layout becomes a ``placement.simulator.ClusterSpec`` (its pools'
   replicas, token budget, batch limit, KV blocks; step times from the profile of its
   worker's thread count; the machine's cores shared) and the simulator replays the very
   requests the bench sends (same seed, arrivals, prompt and output lengths) at each rate
   of a ladder. The ladder is set from the predictions before anything is measured.
3. Measure: ``rounds`` rounds; in each, every layout in turn is deployed and runs the whole
   ladder (short windows), so the layouts alternate (A B C D A B C D ...) and a drift of the
   shared machine's speed falls on all of them; requests of all rounds are pooled per
   (layout, rate).
4. Goodput of a layout, predicted and measured alike: DistServe's (the highest rate with SLO
   attainment >= target) read off the ladder, with linear interpolation where attainment
   crosses the target (from (0, 1) below the first rate). The check: the predicted order
   of the layouts equals the measured order, and every predicted goodput ratio between two
   layouts is within ``--tol`` (15 %) of the measured ratio.

    python -m benchmarks.plan_rank --json --out benchmarks/results/2026-12-06-plan-rank/run
    python -m benchmarks.plan_rank --predict-only --json --out /tmp/pr   # prediction alone, no serving
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.plan_rank_report import analyse, format_table, ladder_goodput

ROOT = Path(__file__).resolve().parents[1]

# The demo's real model. The SLO is set from the profile (SLO_TPOT_X, SLO_TTFT_X) unless
# given: this machine's speed moves several-fold with the other engineers' load (a SmolLM2
# decode step alone: 60 ms quiet, 250 ms at load average 12), so a fixed target in ms is
# met by every layout at one hour and by none at the next; a target in units of the
# machine's own step time, profiled right before the measurement, is not.
BASE: dict[str, Any] = {
    "model": {"builtin": "smollm2-135m-instruct", "name": "demo", "dtype": "float32"},
    "kv_cache": {"block_size": 16},
    "kv_transfer": {"codec": "none", "transport": "auto"},
    "slo": {"ttft_ms": 2500, "tpot_ms": 250, "attainment": 0.9},
    "workload": {"prompt_tokens": [32, 128], "output_tokens": [16, 40]},
}
# TPOT target: this many single-stream decode steps; TTFT target: this many prefills of
# the longest prompt alone.
SLO_TPOT_X = 3.0
SLO_TTFT_X = 4.0
# Layouts that fit this machine's 2 CPUs (DEFAULT_LAYOUTS run unless --layouts names others:
# colocated-1x2cpu needs a two-thread profile, which on an oversubscribed machine is not
# the speed its worker gets while serving; see the results README).
def _colocated(replicas: int, num_cpus: int) -> dict[str, Any]:
    return {"mode": "colocated", "pools": {"colocated": {
        "replicas": replicas, "num_cpus": num_cpus, "max_num_batched_tokens": 512, "max_num_seqs": 64,
        "num_kv_blocks": 512}}}


def _disaggregated(max_num_seqs: int) -> dict[str, Any]:
    return {"mode": "disaggregated", "pools": {
        "prefill": {"replicas": 1, "num_cpus": 1, "max_num_batched_tokens": 512, "num_kv_blocks": 256},
        "decode": {"replicas": 1, "num_cpus": 1, "max_num_seqs": max_num_seqs, "num_kv_blocks": 512}}}


LAYOUTS: dict[str, dict[str, Any]] = {
    "colocated-1x2cpu": _colocated(1, 2),
    "1p1d": _disaggregated(64),
    "colocated-1x1cpu": _colocated(1, 1),
    "1p1d-seqs2": _disaggregated(2),
    "colocated-2x1cpu": _colocated(2, 1),
}
# The serving stack's CPU per request is measured at this rate for this long (host_probe).
HOST_PROBE_RATE = 1.0
HOST_PROBE_S = 20.0
DEFAULT_LAYOUTS = ("1p1d", "colocated-1x1cpu", "colocated-2x1cpu")
# A window lasts --duration seconds, longer where that would hold fewer requests than this.
MIN_REQUESTS = 25
# Each layout's ladder: fractions of its own predicted goodput (the layouts' goodputs differ
# several-fold here, so one common ladder would leave the weaker ones with no rate near
# their crossing). Where the measured crossing falls outside, the result says so (a bound).
LADDER = (0.6, 0.85, 1.1, 1.45)
# Serving costs outside the engine's steps: client end-to-end minus the worker's own time,
# p50 9.1 ms on the SmolLM2 demo (benchmarks/results/2026-12-06-demo-smollm2).
REQUEST_OVERHEAD_S = 0.009
MACHINE_CORES = 2.0


def manifest_dict(name: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, **copy.deepcopy(base or BASE), **copy.deepcopy(LAYOUTS[name])}


def worker_threads(m: dict[str, Any]) -> set[int]:
    return {max(1, int(p.get("num_cpus", 1))) for p in m["pools"].values()}


# ---- prediction -------------------------------------------------------------------------

def profile_via_cli(manifest_path: Path, threads: int, out: Path, refresh: bool = False) -> dict[str, Any]:
    """`splitserve profile MANIFEST --threads T` (cached: placement.profile.cached_profile)."""
    cmd = [sys.executable, "-m", "cluster", "profile", str(manifest_path), "--out", str(out),
           "--threads", str(threads)] + (["--refresh"] if refresh else [])
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise RuntimeError(f"splitserve profile failed ({res.returncode}): {res.stderr[-2000:]}")
    prof = json.loads(out.read_text())
    prof["_cli_seconds"] = round(time.monotonic() - t0, 1)
    prof["_cli_note"] = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    return prof


def cluster_spec(manifest: Any, lats: dict[int, Any], host_cores: float = 0.0) -> Any:
    from placement.catalogue import ModelShape
    from placement.simulator import ClusterSpec, Instance

    shape = ModelShape.from_dir(manifest.model_dir(), bytes_per_param=4 if manifest.model.dtype == "float32" else 2)
    inst = []
    for kind, pool in manifest.pools.items():
        for _ in range(pool.replicas):
            inst.append(Instance(kind, lats[max(1, int(pool.num_cpus))], node=0,
                                 max_batched_tokens=pool.max_num_batched_tokens, max_num_seqs=pool.max_num_seqs,
                                 kv_capacity_tokens=pool.num_kv_blocks * manifest.kv_cache.block_size))
    return ClusterSpec(inst, kv_bytes_per_token=shape.kv_bytes_per_token, link_bps=lambda a, b: 1.3e9,
                       request_overhead_s=REQUEST_OVERHEAD_S, cores=MACHINE_CORES, host_cores=host_cores)


def at_rate(cfg: Any, rate: float, min_requests: int = MIN_REQUESTS) -> Any:
    """The bench config of one window: the rate alone, long enough for min_requests."""
    return dataclasses.replace(cfg, rates=[rate], duration_s=max(cfg.duration_s, min_requests / rate))


def predict_rate(manifest: Any, lats: dict[int, Any], cfg: Any, rate: float, min_requests: int = MIN_REQUESTS,
                 host_s: float = 0.0) -> float:
    """Predicted attainment at `rate` on the very requests the bench sends."""
    from placement.simulator import SimRequest, Simulation

    from benchmarks.simulate import _prompt_len

    specs = at_rate(cfg, rate, min_requests).requests(rate)
    sims = [SimRequest(s.arrival_s, _prompt_len(s), s.output_tokens) for s in specs]
    # The serving stack's own CPU (host_probe) takes rate x host_s of the shared cores.
    Simulation(cluster_spec(manifest, lats, host_cores=rate * host_s)).run(sims)
    ok = sum(1 for r in sims if math.isfinite(r.finish_s) and r.ttft_s * 1e3 <= cfg.slo.ttft_ms
             and r.tpot_s * 1e3 <= cfg.slo.tpot_ms)
    return ok / max(1, len(sims))


def predict_capacity(manifest: Any, lats: dict[int, Any], cfg: Any, min_requests: int = MIN_REQUESTS,
                     host_s: float = 0.0) -> float:
    """Goodput by bisection on rate (same workload and seed): sets the ladder."""
    lo, hi = 0.0, 0.25
    while predict_rate(manifest, lats, cfg, hi, min_requests, host_s) >= cfg.slo.attainment and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(7):
        mid = (lo + hi) / 2
        if predict_rate(manifest, lats, cfg, mid, min_requests, host_s) >= cfg.slo.attainment:
            lo = mid
        else:
            hi = mid
    return lo


# ---- the serving stack's own CPU ---------------------------------------------------------

def _cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of the engine workers (Ray actor processes of a *Worker class) and
    of the rest of the serving stack on this machine: this process (ingress and load
    generator) and Ray's own processes (controller, raylet, GCS, ...)."""
    import psutil

    out = {"workers": 0.0, "host": 0.0}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            t = proc.info["cpu_times"]
        except (psutil.Error, TypeError):
            continue
        if t is None:
            continue
        if cmd.startswith("ray::") and "Worker" in cmd:
            out["workers"] += t.user + t.system
        elif proc.pid == os.getpid() or "ray" in cmd:
            out["host"] += t.user + t.system
    return out


def host_probe(manifest: Any, cfg: Any, rate: float = HOST_PROBE_RATE, seconds: float = HOST_PROBE_S) -> dict[str, Any]:
    """CPU seconds per request of everything but the engine workers, serving the workload
    at a low rate: the ingress (HTTP, tokenizer, streaming), the load generator and Ray's
    processes share this machine's cores with the workers, and the engine profile does not
    see them. Measured once, before the predictions, on one layout."""
    from benchmarks.runner import Collector, bench_target
    from benchmarks.targets import manifest_target

    pcfg = dataclasses.replace(cfg, rates=[rate], duration_s=seconds)
    with manifest_target(manifest, None) as target, tempfile.TemporaryDirectory() as tmp:
        col = Collector(Path(tmp), "host-probe", pcfg)
        c0, t0 = _cpu_seconds(), time.monotonic()
        bench_target(target, pcfg, col)
        c1, elapsed = _cpu_seconds(), time.monotonic() - t0
    n = max(1, len(col.records))
    return {"layout": manifest.name, "rate": rate, "requests": len(col.records), "seconds": round(elapsed, 1),
            "host_cpu_s_per_request": (c1["host"] - c0["host"]) / n,
            "worker_cpu_s_per_request": (c1["workers"] - c0["workers"]) / n, "load": _load()}


# ---- measurement ------------------------------------------------------------------------

def measured_attainment(records: list[Any], slo: Any) -> dict[float, dict[str, Any]]:
    by: dict[float, list[Any]] = {}
    for r in records:
        by.setdefault(float(r.rate), []).append(r)
    out = {}
    for rate, rs in sorted(by.items()):
        good = sum(1 for r in rs if slo.meets_ttft(r) and slo.meets_tpot(r))
        out[rate] = {"attainment": good / len(rs), "requests": len(rs), "failed": sum(1 for r in rs if not r.ok)}
    return out


def _load() -> float:
    return os.getloadavg()[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.metrics import SLO as BenchSLO
    from benchmarks.runner import BenchConfig
    from benchmarks.workload import LengthRange, Workload
    from cluster.manifest import parse_manifest
    from placement.profile import latency_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.layouts.split(",") if args.layouts else list(DEFAULT_LAYOUTS)
    dicts = {n: manifest_dict(n) for n in names}
    wl = BASE["workload"]

    # 1. profiles through the CLI, one per worker thread count.
    (out / "profile-manifest.yaml").write_text(yaml.safe_dump(dicts[names[0]], sort_keys=False))
    threads = sorted(set().union(*(worker_threads(d) for d in dicts.values())))
    profiles: dict[int, dict[str, Any]] = {}
    for t in threads:
        load0 = _load()
        profiles[t] = profile_via_cli(out / "profile-manifest.yaml", t, out / f"profile-t{t}.json",
                                      args.refresh_profile)
        profiles[t]["_load_before"] = load0
        profiles[t]["_load_after"] = _load()
    lats = {t: latency_model(p) for t, p in profiles.items()}

    # The SLO in units of this machine's profiled speed (one thread), unless given.
    slo = dict(BASE["slo"])
    mean_ctx = (wl["prompt_tokens"][0] + wl["prompt_tokens"][1]) // 2
    slo["tpot_ms"] = args.slo_tpot_ms or round(float(SLO_TPOT_X * lats[min(lats)].decode_s(1, mean_ctx) * 1e3), 1)
    slo["ttft_ms"] = args.slo_ttft_ms or round(float(SLO_TTFT_X * lats[min(lats)].prefill_s([wl["prompt_tokens"][1]]) * 1e3), 1)
    for d in dicts.values():
        d["slo"] = dict(slo)
    for n, d in dicts.items():
        (out / f"{n}.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    manifests = {n: parse_manifest(d, str(ROOT)) for n, d in dicts.items()}
    cfg = BenchConfig(rates=None, duration_s=args.duration,
                      slo=BenchSLO(slo["ttft_ms"], slo["tpot_ms"], slo["attainment"]),
                      workload=Workload("rank", LengthRange(*wl["prompt_tokens"]), LengthRange(*wl["output_tokens"])),
                      trace=None, seed=args.seed, progress=False, timeout_s=120)

    with contextlib.ExitStack() as stack:
        if not args.predict_only:
            from benchmarks.targets import ray_session

            stack.enter_context(ray_session(None, 2))
        return _predict_and_measure(args, out, names, manifests, lats, cfg, slo, wl, profiles)


def _predict_and_measure(args: argparse.Namespace, out: Path, names: list[str], manifests: dict[str, Any],
                         lats: dict[int, Any], cfg: Any, slo: dict[str, Any], wl: dict[str, Any],
                         profiles: dict[int, dict[str, Any]]) -> dict[str, Any]:
    # 2. the serving stack's own CPU (given, or probed on the first layout), predictions, ladder.
    if args.host_cpu_ms is not None:
        probe: dict[str, Any] = {"given": True, "host_cpu_s_per_request": args.host_cpu_ms / 1e3}
    elif args.predict_only:
        probe = {"given": True, "host_cpu_s_per_request": 0.0}
    else:
        probe = host_probe(manifests[names[0]], cfg)
    host_s = float(probe["host_cpu_s_per_request"])
    print(f"serving stack CPU: {1e3 * host_s:.1f} ms per request ({probe})", file=sys.stderr)
    capacity = {n: predict_capacity(m, lats, cfg, args.min_requests, host_s) for n, m in manifests.items()}
    if min(capacity.values()) <= 0 and not args.rates:
        raise SystemExit(f"plan_rank: a layout meets the SLO {slo} at no rate by the profile ({capacity}); "
                         "give --slo-ttft-ms/--slo-tpot-ms or --rates")
    ladders = {n: ([float(x) for x in args.rates.split(",")] if args.rates
                   else [round(capacity[n] * float(f), 3) for f in args.ladder.split(",")]) for n in names}
    predicted_att = {n: [predict_rate(m, lats, cfg, r, args.min_requests, host_s) for r in ladders[n]]
                     for n, m in manifests.items()}
    predicted = {n: ladder_goodput(ladders[n], predicted_att[n], slo["attainment"]) for n in names}
    result: dict[str, Any] = {
        "layouts": names, "rates": ladders, "slo": slo, "workload": wl, "duration_s": args.duration,
        "rounds": args.rounds, "seed": args.seed, "min_requests": args.min_requests, "ladder": args.ladder,
        "profiles": {t: {k: v for k, v in p.items() if k != "steps"} for t, p in profiles.items()},
        "host_probe": probe, "predicted_capacity_rps": capacity, "predicted_attainment": predicted_att,
        "predicted_goodput_rps": predicted}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.predict_only:
        return result

    # 3. measurement, interleaved.
    from benchmarks.runner import Collector, bench_target
    from benchmarks.targets import manifest_target

    records: dict[str, list[Any]] = {n: [] for n in names}
    windows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate the start each round
        for n in order:
            col = Collector(out / "measured" / f"round{rnd}" / n, n, cfg)
            load0, t0 = _load(), time.time()
            with manifest_target(manifests[n], None) as target:
                for i, rate in enumerate(ladders[n]):
                    wcfg = at_rate(cfg, rate, args.min_requests)
                    if i:
                        wcfg.warmup = 0
                    col.cfg = wcfg
                    bench_target(target, wcfg, col)
            records[n].extend(col.records)
            att = measured_attainment(col.records, cfg.slo)
            windows.append({"round": rnd, "layout": n, "start": t0, "seconds": round(time.time() - t0, 1),
                            "load_before": load0, "load_after": _load(),
                            "attainment": {str(r): v["attainment"] for r, v in att.items()}})
            (out / "windows.json").write_text(json.dumps(windows, indent=2) + "\n")
    result["windows"] = windows
    result = analyse(out, result, args.tol)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan_rank", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", help=f"comma-separated subset of {', '.join(LAYOUTS)}")
    p.add_argument("--rates", help="one ladder of rates for every layout (default: per layout, fractions of its predicted goodput)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per (layout, rate) window")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ladder", default=",".join(str(x) for x in LADDER),
                   help="each layout's rates as fractions of its predicted goodput")
    p.add_argument("--min-requests", type=int, default=MIN_REQUESTS,
                   help="a window lasts long enough for this many requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=0.15)
    p.add_argument("--slo-ttft-ms", type=float, help=f"default: {SLO_TTFT_X} x the profiled prefill of the longest prompt")
    p.add_argument("--slo-tpot-ms", type=float, help=f"default: {SLO_TPOT_X} x the profiled single-stream decode step")
    p.add_argument("--refresh-profile", action="store_true")
    p.add_argument("--host-cpu-ms", type=float, help="the serving stack's CPU per request (ingress, load generator, "
                   "Ray's processes) instead of probing it; --predict-only uses 0 unless given")
    p.add_argument("--predict-only", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--analyse", action="store_true",
                   help="no runs: recompute the measured side and the check from --out's files")
    args = p.parse_args(argv)
    if args.layouts and (bad := [n for n in args.layouts.split(",") if n not in LAYOUTS]):
        p.error(f"--layouts: unknown {bad}; allowed: {', '.join(LAYOUTS)}")
    if args.analyse:
        out = Path(args.out)
        res = analyse(out, json.loads((out / "result.json").read_text()), args.tol)
        if (out / "windows.json").exists():
            res["windows"] = json.loads((out / "windows.json").read_text())
        (out / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    else:
        res = run(args)
    print(format_table(res), file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    return 0 if args.predict_only or res.get("check", {}).get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
