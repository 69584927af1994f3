"""How steady is this machine's speed? Run before a timing-sensitive check (the
simulator check of issue 5 wants the machine's speed steady to well under 15 % over its
~15 minutes).

Two fixed units of work, alternated in short windows so both see the same moments:
- ``dispatch``: 200 tiny matmuls (1x64 @ 64x64) with tanh, bound by per-op overhead and
  memory latency like the demo model's engine steps;
- ``compute``: 8 matmuls of 64x1024 @ 1024x1024, bound by arithmetic like a large
  model's prefill.
Per window, the median time of one unit; then the spread: max / min window, how often a
window is more than 15 % off the run's median, and the change between consecutive
windows of the same kind.

    PYTHONPATH=. python -m benchmarks.machine_noise [--seconds 120] [--window 1] [--json]

Session 6 (2026-12-04), idle machine, 120 s (``results/2026-12-04-noise/``): max/min window
1.79 (dispatch) and 1.51 (compute), 27 % of windows more than 15 % off the median, from a
slowdown of both units together lasting the last ~40 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable


def units() -> dict[str, Callable[[], Any]]:
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    xs, ws = torch.randn(1, 64, generator=g), torch.randn(64, 64, generator=g)
    xc, wc = torch.randn(64, 1024, generator=g), torch.randn(1024, 1024, generator=g)

    def dispatch() -> Any:
        y = xs
        for _ in range(200):
            y = torch.tanh(y @ ws * 0.1)
        return y

    def compute() -> Any:
        y = xc
        for _ in range(8):
            y = torch.tanh(y @ wc * 0.01)
        return y

    return {"dispatch": dispatch, "compute": compute}


def summarize(windows: list[float], tol: float = 0.15) -> dict[str, float]:
    """Spread of per-window median times (any unit): max / min, the share of windows
    more than tol off the median window, and the relative change between consecutive
    windows (median and P90)."""
    if len(windows) < 2:
        raise ValueError(f"need at least 2 windows to measure a spread, got {len(windows)}")
    med = statistics.median(windows)
    changes = sorted(abs(b - a) / a for a, b in zip(windows, windows[1:]))
    p90 = changes[min(len(changes) - 1, int(round(0.9 * (len(changes) - 1))))]
    return {"windows": len(windows), "median": med, "min": min(windows), "max": max(windows),
            "max_over_min": max(windows) / min(windows),
            "share_off_by_tol": sum(abs(w / med - 1) > tol for w in windows) / len(windows),
            "consecutive_change_p50": statistics.median(changes), "consecutive_change_p90": p90}


def measure(seconds: float, window_s: float) -> dict[str, list[float]]:
    fns = units()
    for fn in fns.values():  # warm-up
        for _ in range(20):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, fn in fns.items():
            ts = []
            w_end = time.monotonic() + window_s
            while time.monotonic() < w_end:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[name].append(statistics.median(ts) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--window", type=float, default=1.0, help="seconds per window of each unit")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.window <= 0:
        ap.error("--seconds and --window must be > 0")
    if args.seconds < 4 * args.window:
        ap.error(f"--seconds ({args.seconds}) must allow at least 2 windows of each unit "
                 f"(>= {4 * args.window} s with --window {args.window})")
    raw = measure(args.seconds, args.window)
    res = {name: {**summarize(ws), "window_ms": ws} for name, ws in raw.items()}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for name, r in res.items():
            print(f"{name:9s} median {r['median']:.3f} ms/unit over {r['windows']} windows: max/min "
                  f"{r['max_over_min']:.2f}, {r['share_off_by_tol']:.0%} of windows >15 % off the median, "
                  f"consecutive change P50 {r['consecutive_change_p50']:.0%} P90 {r['consecutive_change_p90']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
