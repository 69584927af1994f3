"""Admit stall (issue 17 item 3): how much longer the decode worker's steps get while a
request's prompt KV is admitted into its running batch, with the KV written in on the
engine thread (before) against into reserved blocks off it (decode_workers.admission),
in the same deployment, phases interleaved (A B A B).

Step times come from benchmarks/steptrace (every LLMEngine.step of every worker, wall
clock start and duration); ``run`` needs SPLITSERVE_STEPTRACE_DIR and
benchmarks/steptrace on PYTHONPATH before Ray starts (``benchmarks.overhead`` sets them).

For each arrival (a step whose batch has more sequences than the step before) the figure
is the longest of that step and the two before it (the KV is written during those when
off the engine thread) over the median of the five steps after it (the same batch, the
arrival included, no admission; arrivals decode 8 tokens): running sequences should see
no step above 1.2x their median. The same ratio of the engine thread's CPU time per step
says what the engine thread itself did, whatever else takes the cores.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def _steps(trace_dir: Path, pid: int) -> list[dict[str, Any]]:
    path = trace_dir / f"steps-{pid}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def analyse(steps: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Arrival stalls among the decode steps that started in [t0, t1)."""
    ph = [s for s in steps if t0 <= s["t"] < t1 and not s["po"]]
    if len(ph) < 5:
        return {"steps": len(ph)}
    ratios, cpu_ratios = [], []
    for i in range(1, len(ph) - 3):
        if len(ph[i]["n"]) > len(ph[i - 1]["n"]):
            # The arrival's step and the two before it (off the engine thread, the KV is
            # written while those run) against the steps right after it, which run the same
            # batch (the new sequence included) with no admission.
            window, after = ph[max(0, i - 2): i + 1], ph[i + 1: i + 6]
            ratios.append(max(s["dt"] for s in window) / statistics.median(s["dt"] for s in after))
            cpu_ratios.append(max(s["cpu"] for s in window) / statistics.median(s["cpu"] for s in after))
    return {"steps": len(ph), "median_step_ms": statistics.median(s["dt"] for s in ph) * 1e3,
            "median_step_cpu_ms": statistics.median(s["cpu"] for s in ph) * 1e3,
            "arrivals": len(ratios), "worst_ratio": max(ratios, default=None),
            "p50_ratio": statistics.median(ratios) if ratios else None,
            "over_1_2": sum(r > 1.2 for r in ratios),
            # The engine thread's own CPU time per step (steptrace "cpu"): what the engine
            # thread did, unaffected by other processes taking the core.
            "worst_cpu_ratio": max(cpu_ratios, default=None),
            "p50_cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            "engine_thread_imports": sum(1 for s in ph if s["imp"])}


def run(url: str, decode: Any, decode_pid: int, trace_dir: Path, model: str = "demo",
        running: int = 4, arrivals: int = 3, prompt_words: int = 60, rounds: int = 2,
        gap_s: float = 0.5) -> dict[str, Any]:
    """``decode``: the decode worker's actor handle. Keeps ``running`` greedy streams going;
    per phase sends ``arrivals`` requests of ~``prompt_words`` words one after the other."""
    import ray

    stop = threading.Event()
    errors: list[str] = []

    def stream(k: int) -> None:
        body = {"model": model, "prompt": f"Count slowly {k}:", "max_tokens": 600, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=300) as c:
            while not stop.is_set():
                with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(r.read().decode()[:200])
                        return
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(running)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # the batch is running
    phases: list[tuple[str, float, float]] = []
    n = 0
    try:
        with httpx.Client(timeout=300) as c:
            for _ in range(rounds):
                for mode in ("engine_thread", "reserved"):
                    ray.get(decode.set_kv_admission.remote(mode), timeout=30)
                    t0 = time.time()
                    for _ in range(arrivals):
                        n += 1
                        words = " ".join(f"w{n}_{j}" for j in range(prompt_words))
                        r = c.post(f"{url}/v1/completions", json={"model": model, "prompt": words, "max_tokens": 8,
                                                                  "temperature": 0, "ignore_eos": True})
                        if r.status_code != 200:
                            errors.append(r.text[:200])
                        time.sleep(gap_s)
                    phases.append((mode, t0, time.time()))
    finally:
        stop.set()
        ray.get(decode.set_kv_admission.remote("reserved"), timeout=30)
        for t in threads:
            t.join(timeout=60)
    steps = _steps(trace_dir, decode_pid)
    per_phase = [{"mode": m, **analyse(steps, a, b)} for m, a, b in phases]
    out: dict[str, Any] = {"phases": per_phase, "errors": errors[:5]}
    for mode in ("engine_thread", "reserved"):
        rs = [p for p in per_phase if p["mode"] == mode and p.get("worst_ratio") is not None]
        out[mode] = {"worst_ratio": max((p["worst_ratio"] for p in rs), default=None),
                     "p50_ratio": statistics.median([p["p50_ratio"] for p in rs]) if rs else None,
                     "worst_cpu_ratio": max((p["worst_cpu_ratio"] for p in rs), default=None),
                     "p50_cpu_ratio": statistics.median([p["p50_cpu_ratio"] for p in rs]) if rs else None,
                     "engine_thread_imports": sum(p["engine_thread_imports"] for p in rs),
                     "arrivals": sum(p["arrivals"] for p in rs),
                     "over_1_2": sum(p["over_1_2"] for p in rs),
                     "median_step_ms": statistics.median([p["median_step_ms"] for p in rs]) if rs else None}
    return out
