"""Engine-only A/B on the real model (SmolLM2-135M-Instruct): decode step time at batch 1
and 8 and prefill time, for the engine of a base git ref against the working tree, in one
run, interleaved (base, new, base, new, ...), each measurement in its own process (a fresh
heap and thread pool; the base ref's engine/ and models/ come from ``git archive``).

Each child loads the model in the given dtype, prefills ``batch`` distinct prompts of
``--prompt-tokens`` tokens (one step each at batch 1, chunked by the scheduler at batch 8),
then times ``--steps`` decode steps (median). Ratios are base / new (above 1: new faster).

    PYTHONPATH=. python -m benchmarks.engine_ab --base-ref c9e5e99 --json [--rounds 3]
        [--dtypes float32,bfloat16] [--threads 1] [--new-env SPLITSERVE_LINEAR=onednn,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def child(batch: int, dtype: str, threads: int, steps: int, prompt_tokens: int) -> dict[str, Any]:
    import time

    import torch

    from engine.engine import LLMEngine
    from engine.sequence import SamplingParams
    from models.builtin import builtin_model_dir

    torch.set_num_threads(threads)
    eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype=dtype,
                                   num_blocks=512, block_size=16)
    for b in range(batch):
        ids = [3 + (b * 7919 + i * 31) % 40000 for i in range(prompt_tokens)]
        eng.add_request(f"r{b}", ids, SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    t0 = time.perf_counter()
    while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    prefill_s = time.perf_counter() - t0
    for _ in range(3):  # warm-up decode steps
        eng.step()
    times = []
    for _ in range(steps):
        t1 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t1)
    return {"prefill_ms": prefill_s * 1e3, "decode_step_ms": statistics.median(times) * 1e3,
            "decode_step_min_ms": min(times) * 1e3, "threads": torch.get_num_threads()}


def _run(src: Path, batch: int, dtype: str, threads: int, steps: int, prompt_tokens: int,
         extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(src), **(extra_env or {}))
    code = (f"import json, benchmarks.engine_ab as m; print('RESULT', json.dumps(m.child({batch}, {dtype!r}, "
            f"{threads}, {steps}, {prompt_tokens})))")
    # benchmarks/ always from the working tree; engine/ and models/ from src.
    env["PYTHONPATH"] = f"{src}{os.pathsep}{ROOT}"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=src, capture_output=True, text=True,
                         timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"child failed ({src}, batch {batch}, {dtype}): {out.stderr[-2000:]}")


def _loadavg() -> float:
    return os.getloadavg()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-ref", required=True, help="git ref of the engine to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--base-env", default="", help="KEY=VALUE,... set for the base side only")
    p.add_argument("--new-env", default="", help="KEY=VALUE,... set for the new side only "
                                                 "(e.g. SPLITSERVE_LINEAR=onednn,SPLITSERVE_COMPILE=decode)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    side_env = {name: dict(kv.split("=", 1) for kv in raw.split(",") if kv)
                for name, raw in (("base", args.base_env), ("new", args.new_env))}
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", args.base_ref, "engine", "models", "cluster",
                               "placement", "kvtransfer", "prefill_workers", "decode_workers"],
                              capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=arch, check=True)
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for dtype in dtypes:
                for batch in batches:
                    for name, src in (("base", base), ("new", ROOT)):
                        la = _loadavg()
                        res = _run(src, batch, dtype, args.threads, args.steps, args.prompt_tokens, side_env[name])
                        res["load1"] = la
                        runs.setdefault(f"{name}/{dtype}/b{batch}", []).append(res)
                        print(f"round {r} {name} {dtype} batch {batch}: {res}", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {"base_ref": args.base_ref, "base_env": side_env["base"], "new_env": side_env["new"],
                               "threads": args.threads, "rounds": args.rounds,
                               "prompt_tokens": args.prompt_tokens, "cases": {}}
    for dtype in dtypes:
        for batch in batches:
            case: dict[str, Any] = {}
            for name in ("base", "new"):
                rs = runs[f"{name}/{dtype}/b{batch}"]
                case[name] = {k: statistics.median(x[k] for x in rs)
                              for k in ("decode_step_ms", "decode_step_min_ms", "prefill_ms")}
                case[name]["load1"] = [round(x["load1"], 1) for x in rs]
            case["decode_ratio_base_over_new"] = case["base"]["decode_step_ms"] / case["new"]["decode_step_ms"]
            case["prefill_ratio_base_over_new"] = case["base"]["prefill_ms"] / case["new"]["prefill_ms"]
            summary["cases"][f"{dtype}/batch{batch}"] = case
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, c in summary["cases"].items():
            print(f"{k}: decode base {c['base']['decode_step_ms']:.1f} ms new {c['new']['decode_step_ms']:.1f} ms "
                  f"(x{c['decode_ratio_base_over_new']:.2f}); prefill base {c['base']['prefill_ms']:.0f} ms "
                  f"new {c['new']['prefill_ms']:.0f} ms (x{c['prefill_ratio_base_over_new']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
