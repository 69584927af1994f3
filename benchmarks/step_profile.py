"""Where a SmolLM2 decode step's time goes (one torch thread by default): the step's wall
time split into schedule+prepare, forward, lm_head, sample+postprocess, and torch.profiler's
top ops by self CPU time. Profiling, not a speed figure: run under ``flock -s``.

    PYTHONPATH=. python -m benchmarks.step_profile --batch 1,8 [--dtype float32] [--threads 1]

Prints one ``RESULT {json}`` line per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def profile_batch(batch: int, dtype: str, threads: int, steps: int, prompt_tokens: int, top: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine.engine import LLMEngine
    from engine.sequence import SamplingParams
    from models.builtin import builtin_model_dir

    torch.set_num_threads(threads)
    eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype=dtype,
                                   num_blocks=512, block_size=16)
    for b in range(batch):
        ids = [3 + (b * 7919 + i * 31) % 40000 for i in range(prompt_tokens)]
        eng.add_request(f"r{b}", ids, SamplingParams(temperature=0, max_tokens=3 * steps + 20, ignore_eos=True))
    while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    # Phases: wrap the runner's forward and the model's lm_head.
    phase: dict[str, list[float]] = {"forward": [], "lm_head": [], "step": []}
    runner, model = eng.runner, eng.runner.model
    fwd, logits_fn = runner.forward, model.compute_logits

    def timed_forward(step: Any, hook: Any) -> Any:
        t = time.perf_counter()
        r = fwd(step, hook)
        phase["forward"].append(time.perf_counter() - t)
        return r

    def timed_logits(h: Any) -> Any:
        t = time.perf_counter()
        r = logits_fn(h)
        phase["lm_head"].append(time.perf_counter() - t)
        return r

    runner.forward, model.compute_logits = timed_forward, timed_logits  # type: ignore[method-assign]
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        phase["step"].append(time.perf_counter() - t)
    runner.forward, model.compute_logits = fwd, logits_fn  # type: ignore[method-assign]
    med = {k: statistics.median(v) * 1e3 for k, v in phase.items()}
    med["other"] = med["step"] - med["forward"] - med["lm_head"]
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(2):
            eng.step()
    ev = p.key_averages()
    ops = sorted((e for e in ev if e.key.startswith(("aten::", "mkldnn::", "mkl::"))),
                 key=lambda e: -e.self_cpu_time_total)
    n_ops = sum(e.count for e in ev if e.key.startswith("aten::")) // 2
    return {"batch": batch, "dtype": dtype, "threads": threads, "ms": {k: round(v, 2) for k, v in med.items()},
            "aten_ops_per_step": n_ops,
            "top_self_ms_per_step": [(e.key, e.count // 2, round(e.self_cpu_time_total / 2e3, 3)) for e in ops[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=150)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    for b in (int(x) for x in a.batch.split(",")):
        print("RESULT", json.dumps(profile_batch(b, a.dtype, a.threads, a.steps, a.prompt_tokens, a.top)), flush=True)


if __name__ == "__main__":
    main()
