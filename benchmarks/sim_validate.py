"""Simulator vs measurement (issue 5): serve each layout of the demo model, measure it the
way `splitserve bench --manifest` does (open-loop Poisson arrivals of the summarize
workload, client and ingress in this process), replay the very same requests (arrival,
prompt and output lengths) through the placement simulator, and compare P50/P90 TTFT
and TPOT.

Nothing in the simulator is tuned on the measured rates. Its inputs come from the same
run, outside the measured load:
1. the engine profile (``placement.profile``): this machine's step times on the batch
   shapes the workers run (token budget, chunked prefill with context, decode batches);
2. the serving overheads (``placement.latency.fit_overheads``), from probe requests sent
   to the served layout before and after the load (medians per probe shape): one at a
   time (prompts of 64..1280 tokens, outputs of 4 and 40) and in bursts that decode as
   one batch (2, 4, 8 sequences); for a layout of several workers also a 4-sequence
   burst while long prompts keep the prefill worker busy: the burst's slowdown and the
   long prompts' give each kind's slowdown beside a busy neighbour
   (``ClusterSpec.shared_slowdown``; older measurements: one ``ClusterSpec.cores``);
   and (since session 6) a long decode alone and beside 6 arriving requests: the decode
   worker's work per request it receives, which its running sequences wait for
   (``admit_from``, ``ClusterSpec.decode_admit_overhead_s``).
Diagnostic, not the prediction: right before and right after every rate window a short
speed probe (prompts of 1024 tokens, outputs of 4 and 24, one at a time) runs; its TTFT
and decode time against the same probe's in the overhead probes (``window_speed``) give
the window's prefill and decode speed factors, and the table shows the prediction with
the steps and overheads scaled by them (``*_window_*``). It tests whether the misses are
the shared machine's speed drifting between the probes and the load (session 6: they
are not; the adjacent probes ran as fast as the overhead probes or faster).
During every probe and rate, the engine busy time of each worker is read from the
workers, so the table also shows measured vs simulated utilisation.
The served side (deploying, probing, running the rates) is ``benchmarks.sim_probes``;
this module fits the model's terms from its probes and compares.

    python -m benchmarks.sim_validate --rates "colocated=3,6,9,12;1p1d=3,6,9,12" --rounds 2 --duration 30 \
        --probe-reps 4 --out /tmp/simval
    python -m benchmarks.sim_validate --resimulate --out /tmp/simval   # model changes only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from placement.latency import LatencyModel, Overheads, fit_overheads
from placement.simulator import ClusterSpec, Instance, SimRequest, Simulation

from benchmarks.sim_probes import (ARRIVAL_COUNT, ARRIVAL_LONG, ARRIVAL_SHORT, BUDGET,  # noqa: E402
                                   KV_BYTES_PER_TOKEN, LAYOUTS, LINK_BPS, SPEED_REPS, SPEED_SHAPES, measure)
from benchmarks.sim_report import _noise, format_noise, format_table, within  # noqa: E402

__all__ = ["ARRIVAL_COUNT", "ARRIVAL_LONG", "ARRIVAL_SHORT", "LAYOUTS", "SPEED_REPS", "SPEED_SHAPES", "admit_from",
           "compare", "format_table", "measure", "overheads_from", "spec_for", "window_speed", "within"]


def spec_for(layout: str, lat: LatencyModel, over: Overheads) -> ClusterSpec:
    pools = LAYOUTS[layout]["pools"]
    insts = [Instance(name, lat, max_batched_tokens=int(p.get("max_num_batched_tokens", BUDGET)),
                      kv_capacity_tokens=int(p["num_kv_blocks"]) * 16)
             for name, p in pools.items()]
    return ClusterSpec(insts, kv_bytes_per_token=KV_BYTES_PER_TOKEN, link_bps=lambda a, b: LINK_BPS,
                       **over.spec_kwargs())


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def window_speed(reference: list[dict[str, Any]], window: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(prefill, decode) speed factors of a window against the reference: the median TTFT
    of the speed probes, and the median decode time (end to end minus TTFT) of those with
    the longest output, window over reference. None when either side lacks two good
    probes of a kind."""
    def ok(xs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [x for x in xs if x.get("ok", True) and x.get("ttft_s") is not None]

    ref, win = ok(reference), ok(window)
    if not ref or not win:
        return None
    longest = max(x["output"] for x in ref)
    ttft_r, ttft_w = [x["ttft_s"] for x in ref], [x["ttft_s"] for x in win]
    dec_r = [x["e2e_s"] - x["ttft_s"] for x in ref if x["output"] == longest]
    dec_w = [x["e2e_s"] - x["ttft_s"] for x in win if x["output"] == longest]
    if min(len(ttft_r), len(ttft_w), len(dec_r), len(dec_w)) < 2:
        return None
    return (statistics.median(ttft_w) / statistics.median(ttft_r),
            statistics.median(dec_w) / statistics.median(dec_r))


# -- the model --------------------------------------------------------------------------------

def _medians(isolated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One probe per (prompt, output): the medians of its repetitions (the machine is
    shared; single requests can be 1.5x off)."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for x in isolated:
        cells.setdefault((x["prompt"], x["output"]), []).append(x)
    out = []
    for (p, o), xs in sorted(cells.items()):
        out.append({"prompt": p, "output": o, "ttft_s": statistics.median(x["ttft_s"] for x in xs),
                    "e2e_s": statistics.median(x["e2e_s"] for x in xs),
                    "busy_s": {k: statistics.median(x["busy_s"][k] for x in xs) for k in xs[0]["busy_s"]}})
    return out


def overheads_from(probes: dict[str, Any], lat: LatencyModel, disaggregated: bool) -> Overheads:
    probes = {**probes, "isolated": _medians(probes["isolated"])}
    iso = [(x["prompt"], x["output"], x["ttft_s"], x["e2e_s"]) for x in probes["isolated"]]
    bursts = [(x["batch"], x["batch"] * (x["prompt"] + x["output"] // 2), x["output"], x["decode_s"])
              for x in probes["bursts"]]
    kv_s = statistics.mean(p * KV_BYTES_PER_TOKEN / LINK_BPS for p, _, _, _ in iso)
    # The prefilling worker's own busy time per probe: the prefill pool's, or the colocated
    # worker's minus the decode steps that followed (short outputs only). A served decode
    # step takes longer than the profiled one (the worker streams tokens beside it), so
    # the steps are priced from the probes themselves: the same prompt with the long
    # output minus with the short one is (long - short) decode steps of busy time.
    cells = {(x["prompt"], x["output"]): x["busy_s"] for x in probes["isolated"]}
    busy: list[float | None] = []
    for x in probes["isolated"]:
        b = x["busy_s"]
        p, o = x["prompt"], x["output"]
        longer = [] if disaggregated else [(o2, cells[(p, o2)]["colocated"]) for (p2, o2) in cells
                                           if p2 == p and o2 > o]
        if disaggregated:
            busy.append(b["prefill"])
        elif o <= 8 and longer:
            o2, b2 = max(longer)
            per_step = max(0.0, (b2 - b["colocated"]) / (o2 - o))
            busy.append(b["colocated"] - (o - 1) * per_step)
        else:
            busy.append(None)
    return fit_overheads(lat, BUDGET, iso, bursts, disaggregated, kv_link_s=kv_s, prefill_busy=busy)


def admit_from(probes: dict[str, Any], layout: str, lat: LatencyModel, over: Overheads,
               contention: float | dict[str, float] | None) -> Overheads:
    """The decode worker's work per request it receives (``Overheads.decode_admit_s``),
    from the arrival probe: the value at which the simulator's long decode beside the
    arrivals runs as much longer than alone as the measured one did (medians; bisection:
    the extra grows with the term, a little faster than linearly where the longer steps
    overlap more of the prefill worker's). Layouts or measurements without the probe keep 0."""
    arr = probes.get("arrivals") or []
    if not arr or LAYOUTS[layout]["mode"] != "disaggregated":
        return over
    measured = statistics.median(x["beside_decode_s"] for x in arr) - statistics.median(x["alone_decode_s"] for x in arr)
    offsets = [statistics.median(x["offsets_s"][j] for x in arr) for j in range(ARRIVAL_COUNT)]

    def extra(admit: float) -> float:
        o = dataclasses.replace(over, decode_admit_s=admit)
        out = []
        for shorts in ([], offsets):
            reqs = [SimRequest(0.0, *ARRIVAL_LONG)] + [SimRequest(t, *ARRIVAL_SHORT) for t in shorts]
            _simulate(layout, lat, o, contention, reqs)
            out.append(reqs[0].tpot_s * (ARRIVAL_LONG[1] - 1))
        return out[1] - out[0]

    lo, hi = 0.0, max(0.0, measured) / ARRIVAL_COUNT + 1e-3
    if extra(lo) >= measured:
        return dataclasses.replace(over, decode_admit_s=0.0)
    while extra(hi) < measured:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if extra(mid) < measured else (lo, mid)
    return dataclasses.replace(over, decode_admit_s=(lo + hi) / 2)


def slowdowns_from(probes: dict[str, Any]) -> dict[str, float] | None:
    """Per instance kind, how much longer a step runs while the other worker is busy (the
    workers share this machine's cores with each other and with the ingress): decode from
    the 4-sequence burst beside a busy prefill worker against the burst alone, prefill from
    the 1280-token prompts sent while that burst decoded against the same prompt alone."""
    loaded = probes.get("loaded_bursts") or []
    alone_d = [x["decode_s"] for x in probes["bursts"] if x["batch"] == 4]
    alone_p = [x["ttft_s"] for x in probes["isolated"] if x["prompt"] == 1280]
    beside = [t for x in loaded for t in x.get("prefill_1280_ttft_s", [])]
    if not loaded or not alone_d or not alone_p or not beside:
        return None
    return {"decode": max(1.0, statistics.mean(x["decode_s"] for x in loaded) / statistics.mean(alone_d)),
            "prefill": max(1.0, statistics.median(beside) / statistics.median(alone_p))}


def cores_from(probes: dict[str, Any], instances: int) -> float | None:
    """Effective cores the layout's workers share: a decode burst beside a busy prefill
    worker runs s times slower than alone, i.e. two busy workers on 2 / s cores."""
    loaded = probes.get("loaded_bursts") or []
    alone = [x["decode_s"] for x in probes["bursts"] if x["batch"] == 4]
    if instances < 2 or not loaded or not alone:
        return None
    slow = statistics.mean(x["decode_s"] for x in loaded) / statistics.mean(alone)
    return float(min(instances, max(1.0, instances / max(slow, 1e-9))))


METRICS = (("ttft", lambda x: x["ttft_s"], lambda s: s.ttft_s), ("tpot", lambda x: x["tpot_s"], lambda s: s.tpot_s))


def _simulate(layout: str, lat: LatencyModel, over: Overheads, contention: float | dict[str, float] | None,
              reqs: list[SimRequest]) -> float:
    """Run reqs through the layout's simulation; the instances' busy seconds.
    contention: the workers' shared cores (``ClusterSpec.cores``) or per-kind slowdowns
    (``.shared_slowdown``)."""
    spec = spec_for(layout, lat, over)
    if isinstance(contention, dict):
        spec.shared_slowdown = contention
    else:
        spec.cores = contention
    Simulation(spec).run(reqs)
    return sum(i.busy_s for i in spec.instances)


def _replay(layout: str, lat: LatencyModel, over: Overheads, contention: float | dict[str, float] | None,
            records: list[dict[str, Any]]) -> tuple[list[SimRequest], float]:
    """The records' requests (arrival, prompt and output lengths) through the simulator:
    the simulated requests and the instances' busy seconds."""
    sim = [SimRequest(x["arrival_s"], x["prompt_tokens"], x["output_tokens"]) for x in records]
    return sim, _simulate(layout, lat, over, contention, sim)


def _factors(meas: dict[str, Any], run: dict[str, Any]) -> tuple[float, float] | None:
    """The window's (prefill, decode) speed factors, None for measurements without speed
    probes (before session 6) or with too few good ones."""
    return window_speed(meas["probes"].get("speed") or [], run.get("speed_probes") or [])


def _errors(row: dict[str, Any], got: list[dict[str, Any]], sim: list[SimRequest], suffix: str) -> None:
    for metric, get_m, get_s in METRICS:
        m = [get_m(x) for x in got if get_m(x) is not None]
        for q in (50, 90):
            mv, sv = pct(m, q), pct([get_s(x) for x in sim], q)
            row[f"{metric}_p{q}_{suffix}_ms"] = sv * 1e3
            row[f"{metric}_p{q}_{suffix}_error"] = (sv - mv) / mv if mv else float("nan")


def compare(layout: str, lat: LatencyModel, over: Overheads, meas: dict[str, Any],
            contention: float | dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per rate: measured percentiles over every round's requests against the
    simulated ones (each round replayed on its own: its arrivals start at 0), and the
    spread of the measured percentile between rounds (the measurement's own
    repeatability on this machine). Diagnostics beside it: ``*_window_*`` with each
    round's steps and overheads scaled by its window's speed factors, and
    ``*_speed_adjusted_*`` by the measured / simulated busy time."""
    rows = meas["records"]
    table = []
    for rate in sorted({run["rate"] for run in meas["runs"]}):
        runs = [run for run in meas["runs"] if run["rate"] == rate]
        per_round: list[list[dict[str, Any]]] = []
        sim: list[SimRequest] = []
        static: list[SimRequest] = []
        factors: list[tuple[float, float] | None] = []
        sim_busy = static_busy = 0.0
        for run in runs:
            mine = [x for x in rows if x["rate"] == rate and x["ok"] and x.get("round", 0) == run.get("round", 0)]
            per_round.append(mine)
            f = _factors(meas, run)
            factors.append(f)
            s_reqs, busy = _replay(layout, lat, over, contention, mine)
            static += s_reqs
            static_busy += busy
            if f is not None:  # without speed probes the window column is the prediction
                s_reqs, busy = _replay(layout, lat.scaled(*f), over.scaled(*f), contention, mine)
            sim += s_reqs
            sim_busy += busy
        got = [x for r in per_round for x in r]
        meas_busy = sum(sum(run["busy_s"].values()) for run in runs)
        row: dict[str, Any] = {"layout": layout, "rate": rate, "n": len(got), "rounds": len(runs),
                               "loadavg": max(run["loadavg_before"][0] for run in runs),
                               "window_factors": factors}
        for metric, get_m, get_s in METRICS:
            m = [get_m(x) for x in got if get_m(x) is not None]
            for q in (50, 90):
                mv = pct(m, q)
                row[f"{metric}_p{q}_measured_ms"] = mv * 1e3
                rounds = [pct([get_m(x) for x in r if get_m(x) is not None], q) for r in per_round]
                row[f"{metric}_p{q}_rounds_ms"] = [v * 1e3 for v in rounds]
                row[f"{metric}_p{q}_spread"] = max(rounds) / min(rounds) - 1 if min(rounds) > 0 else float("nan")
        _errors(row, got, static, "predicted")
        _errors(row, got, sim, "window")
        cpu = [run["cpu_s"] for run in runs if "cpu_s" in run]
        if cpu and all("machine_busy" in c for c in cpu):
            wall = sum(c["wall"] for c in cpu)
            row["cores_busy"] = sum(c["machine_busy"] for c in cpu) / wall
            row["client_cores"] = sum(c["this_process"] for c in cpu) / wall
        row["busy_measured_s"] = meas_busy
        row["busy_predicted_s"] = static_busy
        row["busy_window_s"] = sim_busy
        # Diagnostic only (not the prediction): the static simulation with the engine's
        # steps scaled by the measured / simulated busy time, i.e. had the model known
        # how fast the shared machine was during the measured requests themselves.
        k = meas_busy / static_busy if static_busy > 0 else 1.0
        row["machine_speed_factor"] = k
        adj = [r for run in per_round for r in _replay(layout, lat.scaled(k), over, contention, run)[0]]
        _errors(row, got, adj, "speed_adjusted")
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2,4,6,7", help="rates for every layout, or per layout: "
                    "colocated=2,3,4,5;1p1d=2,4,6,7")
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--layouts", default="colocated,1p1d")
    ap.add_argument("--rounds", type=int, default=1, help="run every rate this many times (all rates, "
                    "then all again); the table pools them and shows the spread between rounds")
    ap.add_argument("--probe-reps", type=int, default=2, help="probe rounds before and after the load")
    ap.add_argument("--noise-seconds", type=float, default=20, help="benchmarks.machine_noise before and after "
                    "the measurement (0: skip); the table says how steady the machine was")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--resimulate", action="store_true",
                    help="only re-run the simulator on the measurements already in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layouts = args.layouts.split(",")
    rates: dict[str, list[float]] = {}
    for part in args.rates.split(";"):
        name, _, rs = part.rpartition("=")
        for lay in ([name] if name else layouts):
            rates[lay] = [float(x) for x in rs.split(",")]
    from placement.profile import latency_model, profile_engine

    if args.resimulate:
        prof = json.loads((out / "profile.json").read_text())
    else:
        import cluster  # noqa: F401 - Ray environment before ray is imported
        from models.builtin import builtin_model_dir

        prof = profile_engine(builtin_model_dir("tiny-llama"), threads=1, max_batched_tokens=BUDGET)
        (out / "profile.json").write_text(json.dumps(prof, indent=2))
    lat = latency_model(prof)
    noise: dict[str, Any] = {}
    if not args.resimulate and args.noise_seconds > 0:
        noise["before"] = _noise(args.noise_seconds)
    elif (out / "noise.json").exists():
        noise = json.loads((out / "noise.json").read_text())
    table = []
    fitted = {}
    for layout in layouts:
        mpath = out / f"{layout}.measured.json"
        if args.resimulate:
            meas = json.loads(mpath.read_text())
        else:
            meas = measure(layout, rates[layout], args.duration, out, args.probe_reps, args.rounds)
            mpath.write_text(json.dumps(meas))
        over = overheads_from(meas["probes"], lat, LAYOUTS[layout]["mode"] == "disaggregated")
        contention: float | dict[str, float] | None = None
        if len(LAYOUTS[layout]["pools"]) > 1:
            contention = (slowdowns_from(meas["probes"])
                          or cores_from(meas["probes"], len(LAYOUTS[layout]["pools"])))
        over = admit_from(meas["probes"], layout, lat, over, contention)
        fitted[layout] = {**over.__dict__, "cores": contention}
        table += compare(layout, lat, over, meas, contention)
    if not args.resimulate and args.noise_seconds > 0:
        noise["after"] = _noise(args.noise_seconds)
        (out / "noise.json").write_text(json.dumps(noise, indent=2))
    (out / "table.json").write_text(json.dumps({"profile": prof, "overheads": fitted, "table": table,
                                                "machine_noise": noise}, indent=2))
    (out / "table.md").write_text(format_table(table) + "\n" + format_noise(noise))
    if args.json:
        print(json.dumps({"profile": prof, "overheads": fitted, "table": table}, indent=2))
    else:
        print(json.dumps({"profile": {k: v for k, v in prof.items() if k != "steps"}, "overheads": fitted}, indent=1))
        print(format_table(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
