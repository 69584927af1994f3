"""The plan-ranking benchmark's reading (benchmarks/plan_rank.py): goodput off a ladder of
rates, the predicted vs measured order and goodput ratios, and the results table. Pure:
reads the requests the measurement windows wrote, runs nothing."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any


def ladder_goodput(rates: list[float], attainment: list[float], target: float) -> float:
    """DistServe's goodput read off a ladder: the highest rate with attainment >= target,
    interpolated linearly to where attainment crosses the target between two rates (and
    between (0, 1.0) and the first rate when even the first misses). A ladder that meets
    the target at every rate gives its highest rate (a lower bound)."""
    pts = [(0.0, 1.0)] + sorted(zip(rates, attainment))
    best = 0.0
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 >= target:
            best = r1
            continue
        if a0 >= target:  # crosses between r0 and r1
            best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1) if a0 > a1 else r0
        break
    return best


def compare_rankings(predicted: dict[str, float], measured: dict[str, float], tol: float = 0.15
                     ) -> dict[str, Any]:
    """Order and pairwise ratios. A ratio is a/b with a ranked above b by the measurement;
    its error is predicted/measured - 1."""
    pred_order = sorted(predicted, key=lambda k: -predicted[k])
    meas_order = sorted(measured, key=lambda k: -measured[k])
    pairs = []
    for a, b in itertools.combinations(meas_order, 2):
        mr = measured[a] / measured[b] if measured[b] > 0 else math.inf
        pr = predicted[a] / predicted[b] if predicted[b] > 0 else math.inf
        err = pr / mr - 1 if math.isfinite(mr) and math.isfinite(pr) and mr > 0 else math.inf
        pairs.append({"pair": f"{a}/{b}", "predicted": pr, "measured": mr, "rel_error": err,
                      "within": abs(err) <= tol})
    return {"predicted_order": pred_order, "measured_order": meas_order,
            "order_matches": pred_order == meas_order, "ratios": pairs,
            "ratios_within": sum(p["within"] for p in pairs), "ratios_total": len(pairs),
            "passed": pred_order == meas_order and all(p["within"] for p in pairs)}


def _attainment(rows: list[dict[str, Any]], slo: dict[str, Any]) -> dict[float, dict[str, Any]]:
    by: dict[float, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(float(r["rate"]), []).append(r)
    out = {}
    for rate, rs in sorted(by.items()):
        good = sum(1 for r in rs if r["ok"] and r["ttft_s"] is not None and r["ttft_s"] * 1e3 <= slo["ttft_ms"]
                   and r["tpot_s"] is not None and r["tpot_s"] * 1e3 <= slo["tpot_ms"])
        out[rate] = {"attainment": good / len(rs), "requests": len(rs), "failed": sum(1 for r in rs if not r["ok"])}
    return out


def analyse(out: Path, result: dict[str, Any], tol: float = 0.15) -> dict[str, Any]:
    """Measured goodput and the check from the requests the windows wrote
    (out/measured/round*/LAYOUT/requests.jsonl; whole windows only, so an interrupted run
    is analysed as far as it got)."""
    slo, names = result["slo"], result["layouts"]
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    rounds: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for f in sorted((out / "measured").glob("round*/*/requests.jsonl")):
        rnd, n = int(f.parent.parent.name[5:]), f.parent.name
        if n not in rows:
            continue
        rs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        rows[n] += rs
        rounds.setdefault(rnd, {})[n] = rs
    att = {n: _attainment(rows[n], slo) for n in names}
    target = slo["attainment"]
    measured = {n: ladder_goodput(list(att[n]), [v["attainment"] for v in att[n].values()], target)
                for n in names if att[n]}
    # Where the measured crossing is off the ladder: below its first rate (read from the
    # (0, 1) anchor: coarse) or above its last measured rate (a lower bound).
    crossing = {}
    for n, a in att.items():
        if not a:
            continue
        vals = [v["attainment"] for v in a.values()]
        crossing[n] = ("above the measured rates (lower bound)" if all(v >= target for v in vals)
                       else "below the first rate (interpolated from (0, 1))" if vals[0] < target else "on the ladder")
    per_round = {}
    for rnd, by in sorted(rounds.items()):
        if set(by) != set(names):
            continue
        per_round[rnd] = {}
        for n, rs in by.items():
            a = _attainment(rs, slo)
            per_round[rnd][n] = ladder_goodput(list(a), [v["attainment"] for v in a.values()], target)
    result = dict(result)
    result.update({"measured_attainment": {n: {str(r): v for r, v in a.items()} for n, a in att.items()},
                   "measured_goodput_rps": measured, "measured_crossing": crossing,
                   "measured_goodput_per_round": per_round,
                   "rates_measured": {n: {str(rnd): sorted({r["rate"] for r in by.get(n, [])}) for rnd, by in rounds.items()}
                                      for n in names}})
    if set(measured) == set(names):
        result["check"] = compare_rankings(result["predicted_goodput_rps"], measured, tol)
        result["check_per_round"] = {r: compare_rankings(result["predicted_goodput_rps"], g, tol)
                                     for r, g in per_round.items()}
    return result


def format_table(res: dict[str, Any]) -> str:
    lines = ["| layout | predicted goodput req/s | measured goodput req/s | predicted attainment per rate | "
             "measured attainment per rate |", "|---|---|---|---|---|"]
    for n in res["layouts"]:
        pa = ", ".join(f"{a:.2f}" for a in res["predicted_attainment"][n])
        ma = ", ".join(f"{v['attainment']:.2f}" for v in res.get("measured_attainment", {}).get(n, {}).values())
        mg = res.get("measured_goodput_rps", {}).get(n)
        lines.append(f"| {n} | {res['predicted_goodput_rps'][n]:.3f} | {'' if mg is None else f'{mg:.3f}'} | "
                     f"{pa} | {ma} |")
    if "check" in res:
        c = res["check"]
        lines += ["", f"order predicted {c['predicted_order']}, measured {c['measured_order']}: "
                  f"{'match' if c['order_matches'] else 'DIFFER'}", "",
                  "| ratio | predicted | measured | error |", "|---|---|---|---|"]
        for p in c["ratios"]:
            lines.append(f"| {p['pair']} | {p['predicted']:.2f} | {p['measured']:.2f} | {p['rel_error']:+.1%} |")
    return "\n".join(lines)


