"""Engine step times on CPU, three variants side by side in one run, each in its own process
(the allocator setting is per process):

- ``baseline``: glibc's default malloc thresholds, decode attention copying K/V per query
  head (``repeat_interleave``), the engine before session 5;
- ``malloc``: the engine's allocator tuning (``engine/alloc.py``), same attention;
- ``engine``: both, what the engine runs now (allocator tuning, SDPA ``enable_gqa``).

Each variant runs ``splitserve profile``'s workload on the demo model (prefill sets, decode
batches 1-16 at contexts 64-1536, mixed steps as the batches fill) and reports the step time
per decode shape, the latency model's fit errors, and the signed error of the fitted model on
the mixed steps (what colocated workers run). Variants alternate for ``--rounds`` rounds;
a shape's time is its median over rounds. Ratios are baseline / variant (above 1: faster).

    PYTHONPATH=. python -m benchmarks.decode_bench [--json] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

VARIANTS = ("baseline", "malloc", "engine")
SHAPES = ((4, 1536), (8, 1024), (8, 1536), (16, 512), (16, 1024), (16, 1536))


def _decode_batch_repeat(q: Any, cache: Any, tables: list[list[int]], ctx: list[int], scale: float,
                         window: int | None) -> Any:
    """The decode attention before session 5: K/V expanded to every query head by a copy."""
    import torch
    import torch.nn.functional as F

    from engine.attention import _expand, _visible

    bs = cache.shape[2]
    nblk = max(-(-c // bs) for c in ctx)
    table = torch.zeros(len(ctx), nblk, dtype=torch.long)
    for b, (t, c) in enumerate(zip(tables, ctx)):
        used = -(-c // bs)
        table[b, :used] = torch.tensor(t[:used], dtype=torch.long)
    kv = cache[:, table].flatten(2, 3)
    lens = torch.tensor(ctx)
    k_pos = torch.arange(kv.shape[2])[None, :]
    mask = (k_pos < lens[:, None]) & _visible((lens - 1)[:, None], k_pos, window)
    groups = q.shape[1] // cache.shape[3]
    k = _expand(kv[0].transpose(1, 2), groups, 1)
    v = _expand(kv[1].transpose(1, 2), groups, 1)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                          scale=scale).squeeze(2)


def child(variant: str) -> dict[str, Any]:
    """One variant's profile, in this process (its environment carries the malloc setting)."""
    import engine.attention as attention
    from models.builtin import builtin_model_dir
    from engine.alloc import tune_malloc
    from placement.profile import DECODE_CONTEXTS, _kind, latency_model, profile_engine

    if variant == "baseline":
        attention._decode_batch = _decode_batch_repeat
    prof = profile_engine(builtin_model_dir("tiny-llama"), threads=1, max_batched_tokens=512, keep_steps=True)
    steps = prof.pop("steps")
    model = latency_model(prof)
    dec: dict[str, list[float]] = {}
    signed_mixed = []
    for ns, cs, t in steps:
        kind = _kind(ns)
        if kind == "decode":
            ctx = min(DECODE_CONTEXTS, key=lambda c: abs(c - max(cs)))
            key = f"{len(ns)}x{ctx}"
            dec.setdefault(key, []).append(t)
        elif kind == "mixed":
            chunks = [(n, c) for n, c in zip(ns, cs) if n > 1]
            decs = [c for n, c in zip(ns, cs) if n == 1]
            pred = model.mixed_s([n for n, _ in chunks], [c for _, c in chunks], len(decs),
                                 sum(c + 1 for c in decs))
            signed_mixed.append((pred - t) / t)
    return {"variant": variant, "malloc_tuned": tune_malloc(),
            "decode_ms": {k: 1e3 * statistics.median(v) for k, v in dec.items()},
            "fit": {k: v for k, v in prof.items() if k.startswith(("median_rel", "max_rel"))},
            "mixed_signed_error_median": statistics.median(signed_mixed) if signed_mixed else None,
            "decode_coeffs": prof["decode"]}


def _spawn(variant: str) -> dict[str, Any]:
    env = dict(os.environ, SPLITSERVE_MALLOC_TUNE="0" if variant == "baseline" else "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "benchmarks.decode_bench", "--child", variant],
                         env=env, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"decode_bench child {variant!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            runs[v].append(_spawn(v))
    summary: dict[str, Any] = {}
    for v, rs in runs.items():
        keys = set().union(*(r["decode_ms"] for r in rs))
        summary[v] = {
            "malloc_tuned": [r["malloc_tuned"] for r in rs],
            "decode_ms": {k: statistics.median(r["decode_ms"][k] for r in rs if k in r["decode_ms"])
                          for k in sorted(keys, key=lambda s: tuple(map(int, s.split("x"))))},
            "median_rel_error_decode": statistics.median(r["fit"]["median_rel_error_decode"] for r in rs),
            "max_rel_error_decode": statistics.median(r["fit"]["max_rel_error_decode"] for r in rs),
            "median_rel_error_prefill": statistics.median(r["fit"]["median_rel_error_prefill"] for r in rs),
            "mixed_signed_error_median": statistics.median(r["mixed_signed_error_median"] for r in rs),
        }
    base = summary["baseline"]["decode_ms"]
    for v in VARIANTS[1:]:
        summary[v]["speedup_vs_baseline"] = {k: base[k] / t for k, t in summary[v]["decode_ms"].items()
                                             if k in base and t > 0}
    return {"rounds": rounds, "variants": summary, "runs": runs}


def format_table(res: dict[str, Any]) -> str:
    s = res["variants"]
    keys = [f"{b}x{c}" for b, c in SHAPES if f"{b}x{c}" in s["baseline"]["decode_ms"]]
    lines = ["| decode step (batch x context) | baseline ms | malloc ms | engine ms | baseline/engine |",
             "|---|---|---|---|---|"]
    for k in keys:
        b, m, e = (s[v]["decode_ms"].get(k, float("nan")) for v in VARIANTS)
        lines.append(f"| {k} | {b:.1f} | {m:.1f} | {e:.1f} | {b / e:.2f}x |")
    lines += ["", "| fit | baseline | malloc | engine |", "|---|---|---|---|"]
    for f in ("median_rel_error_decode", "max_rel_error_decode", "median_rel_error_prefill",
              "mixed_signed_error_median"):
        fmt = "+.1f" if "signed" in f else ".1f"
        lines.append(f"| {f} | " + " | ".join(f"{100 * s[v][f]:{fmt}} %" for v in VARIANTS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child)))
        return 0
    if a.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {a.rounds}")
    res = run(a.rounds)
    print(json.dumps(res, indent=1) if a.json else format_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
