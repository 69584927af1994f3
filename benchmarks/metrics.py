"""Per-request records and everything computed from them. `compute_summary` is the one
place the client-side part of summary.json comes from, so that summary.json can always be
recomputed from requests.jsonl (tests do exactly that).

Definitions (all times in seconds, measured at the client):
- ttft_s: send -> first token; e2e_s: send -> end of the stream (or -> the failure);
- tpot_s: (e2e_s - ttft_s) / (output_tokens - 1), 0 for one-token outputs (vLLM's);
- a request meets the SLO when it succeeded and ttft_s <= TTFT SLO and tpot_s <= TPOT SLO;
  failed requests count against attainment (they are in the denominator, never met);
- elapsed_s of a run: from the first send (t=0) to the last request's end,
  max(arrival_s + e2e_s), as vLLM's benchmark duration;
- throughput_rps = succeeded / elapsed_s; goodput_rps = requests meeting both SLOs /
  elapsed_s: vLLM's `--goodput` at that rate;
- DistServe's goodput of a layout at a node count: the highest swept rate at which the
  both-SLO attainment is >= the target, that rate and every lower swept rate included
  (the grid of `--rates` is the resolution), divided by the accelerators the layout uses.
  "Per GPU" on a CPU-only machine means per CPU reserved by the pools (Ray `num_cpus` of
  every rank: replicas x tp x num_cpus); `gpu_unit` says which one a summary used.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The fields of requests.jsonl, in order (DESIGN.md, fixed interface).
FIELDS = ("rate", "nodes", "arrival_s", "prompt_tokens", "output_tokens", "ttft_s", "tpot_s",
          "e2e_s", "ok", "error")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    rate: float              # offered rate of the run (requests/s)
    nodes: int               # node count of the run
    arrival_s: float         # scheduled send time after the run's start
    prompt_tokens: int       # prompt length (the server's usage count when it reports one)
    output_tokens: int       # tokens received
    ttft_s: float | None     # None when no token arrived
    tpot_s: float | None     # None for failed requests
    e2e_s: float | None      # send -> end of stream or failure
    ok: bool
    error: str | None        # None when ok

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise ValueError(f"request record lacks {missing}")
        return cls(**{f: d[f] for f in FIELDS})


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float
    attainment: float  # target fraction for DistServe's goodput

    def meets_ttft(self, r: RequestRecord) -> bool:
        return r.ok and r.ttft_s is not None and r.ttft_s * 1e3 <= self.ttft_ms

    def meets_tpot(self, r: RequestRecord) -> bool:
        return r.ok and r.tpot_s is not None and r.tpot_s * 1e3 <= self.tpot_ms

    def meets(self, r: RequestRecord) -> bool:
        return self.meets_ttft(r) and self.meets_tpot(r)


def read_records(path: str | Path) -> list[RequestRecord]:
    with Path(path).open(encoding="utf-8") as f:
        return [RequestRecord.from_dict(json.loads(line)) for line in f if line.strip()]


def write_records(path: str | Path, records: list[RequestRecord]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def _errors(records: list[RequestRecord]) -> dict[str, int]:
    """Failure counts by message (first 80 characters), most frequent first."""
    c = Counter((r.error or "unknown")[:80] for r in records if not r.ok)
    return dict(c.most_common(10))


def summarize_run(records: list[RequestRecord], slo: SLO) -> dict[str, Any]:
    """Metrics of one (nodes, rate) run."""
    n = len(records)
    ok = [r for r in records if r.ok]
    ends = [r.arrival_s + r.e2e_s for r in records if r.e2e_s is not None]
    elapsed = max(ends) if ends else 0.0
    good = sum(slo.meets(r) for r in records)

    def frac(k: int) -> float:
        return k / n if n else 0.0

    def per_s(x: float) -> float:
        return x / elapsed if elapsed > 0 else 0.0

    return {
        "nodes": records[0].nodes if records else None,
        "rate": records[0].rate if records else None,
        "requests": n,
        "succeeded": len(ok),
        "failed": n - len(ok),
        "errors": _errors(records),
        "elapsed_s": elapsed,
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": _stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        "attainment": {"ttft": frac(sum(slo.meets_ttft(r) for r in records)),
                       "tpot": frac(sum(slo.meets_tpot(r) for r in records)),
                       "both": frac(good)},
        "throughput_rps": per_s(len(ok)),
        "output_tokens_per_s": per_s(sum(r.output_tokens for r in ok)),
        "goodput_rps": per_s(good),
    }


def distserve_goodput(runs: list[dict[str, Any]], target: float) -> float:
    """Highest rate such that it and every lower rate of the sweep meet the target
    attainment (both SLOs); 0 when the lowest rate already misses it."""
    best = 0.0
    for run in sorted(runs, key=lambda x: x["rate"]):
        if run["attainment"]["both"] < target:
            break
        best = run["rate"]
    return best


def compute_summary(records: list[RequestRecord], config: dict[str, Any]) -> dict[str, Any]:
    """The client-side summary: runs per (nodes, rate) and goodput per node count.

    config must hold slo_ttft_ms, slo_tpot_ms, attainment_target and gpus ({nodes: count}
    of accelerators, keys as strings as in JSON); it is copied into the result."""
    slo = SLO(config["slo_ttft_ms"], config["slo_tpot_ms"], config["attainment_target"])
    groups: dict[tuple[int, float], list[RequestRecord]] = {}
    for r in records:
        groups.setdefault((r.nodes, r.rate), []).append(r)
    runs = [summarize_run(groups[k], slo) for k in sorted(groups)]
    goodput = []
    for nodes in sorted({k[0] for k in groups}):
        mine = [run for run in runs if run["nodes"] == nodes]
        gpus = float(config["gpus"].get(str(nodes), 0) or 0)
        best = distserve_goodput(mine, slo.attainment)
        vllm_best = max(run["goodput_rps"] for run in mine)
        goodput.append({
            "nodes": nodes,
            "gpus": gpus,
            "distserve_rate_rps": best,
            "distserve_per_gpu_rps": best / gpus if gpus else None,
            "vllm_goodput_max_rps": vllm_best,
            "vllm_goodput_max_per_gpu_rps": vllm_best / gpus if gpus else None,
        })
    return {"config": dict(config), "runs": runs, "goodput": goodput}
