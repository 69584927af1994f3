"""The simulator-vs-measurement benchmark's tables (benchmarks/sim_validate.py): cells within
the tolerance, the predicted and diagnostic tables, and the machine's noise around a run."""

from __future__ import annotations

from typing import Any


def _fmt_factors(fs: list[tuple[float, float] | None]) -> str:
    return " ".join("-" if f is None else f"{f[0]:.2f}/{f[1]:.2f}" for f in fs)


KEYS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")


def within(table: list[dict[str, Any]], suffix: str = "predicted", tol: float = 0.15) -> int:
    """Cells (rate x percentile x metric) whose prediction is within tol of measured."""
    return sum(abs(r[f"{k}_{suffix}_error"]) <= tol for r in table for k in KEYS)


def format_table(table: list[dict[str, Any]]) -> str:
    lines = [f"Predicted: {within(table)} of {4 * len(table)} cells within 15 %.",
             "",
             "| layout | rate | n | load | cores busy (client) | TTFT P50 ms meas/pred (err) [spread] "
             "| TTFT P90 | TPOT P50 | TPOT P90 | busy s meas/pred |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        cells = [f"{r[k + '_measured_ms']:.1f} / {r[k + '_predicted_ms']:.1f} ({r[k + '_predicted_error']:+.0%})"
                 + (f" [{r[k + '_spread']:.0%}]" if r.get("rounds", 1) > 1 else "")
                 for k in KEYS]
        cores = f"{r['cores_busy']:.2f} ({r['client_cores']:.2f})" if "cores_busy" in r else "-"
        lines.append(f"| {r['layout']} | {r['rate']:g} | {r['n']} | {r['loadavg']:.2f} | {cores} | " + " | ".join(cells)
                     + f" | {r['busy_measured_s']:.2f} / {r['busy_predicted_s']:.2f} |")
    lines += ["", "Diagnostics. Window: steps and overheads scaled by the speed probes right before and after "
              f"each window (prefill/decode factor per round): {within(table, 'window')} of {4 * len(table)} within "
              "15 %. Busy: steps scaled by measured / simulated busy time, i.e. had the simulator known the "
              f"machine's speed during the measured requests themselves: {within(table, 'speed_adjusted')} of "
              f"{4 * len(table)}.", "",
              "| layout | rate | window factors | TTFT P50 | TTFT P90 | TPOT P50 | TPOT P90 | busy factor | TTFT P50 "
              "| TTFT P90 | TPOT P50 | TPOT P90 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        st = [f"{r[k + '_window_ms']:.1f} ({r[k + '_window_error']:+.0%})" for k in KEYS]
        adj = [f"{r[k + '_speed_adjusted_ms']:.1f} ({r[k + '_speed_adjusted_error']:+.0%})" for k in KEYS]
        lines.append(f"| {r['layout']} | {r['rate']:g} | {_fmt_factors(r['window_factors'])} | " + " | ".join(st)
                     + f" | {r['machine_speed_factor']:.2f} | " + " | ".join(adj) + " |")
    return "\n".join(lines)


def _noise(seconds: float) -> dict[str, Any]:
    from benchmarks.machine_noise import measure as noise_measure
    from benchmarks.machine_noise import summarize

    return {name: summarize(ws) for name, ws in noise_measure(seconds, 1.0).items()}


def format_noise(noise: dict[str, Any]) -> str:
    """One line per noise check: how steady the machine was around the measurement."""
    if not noise:
        return ""
    lines = ["", "Machine speed around the measurement (benchmarks.machine_noise, 1 s windows):"]
    for when, res in noise.items():
        lines.append(f"- {when}: " + "; ".join(f"{k} max/min {r['max_over_min']:.2f}, {r['share_off_by_tol']:.0%} "
                                                 "of windows >15 % off" for k, r in res.items()))
    return "\n".join(lines) + "\n"
