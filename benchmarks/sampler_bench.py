"""The sampler's cost per decode step with the API's per-request features, side by side
against plain greedy sampling of the same batch: penalties and logit_bias, logprobs,
seeded sampling, a JSON-schema grammar mask. Logits are random (the sampler does not care
what they mean); vocabulary and tokenizer are the real model's when a grammar is asked.

    python -m benchmarks.sampler_bench [--batch 64] [--vocab 49152] [--json]

Times are medians of interleaved repetitions (this machine's speed drifts); the ratio to
plain greedy is the figure to read."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.sampler import Sampler
from engine.sequence import SamplingParams, Sequence

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


def cases(grammar: str | None) -> dict[str, SamplingParams]:
    out = {
        "greedy": SamplingParams(temperature=0),
        "greedy+penalties+bias": SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5,
                                                presence_penalty=0.5, logit_bias={5: 1.0, 7: -2.0}),
        "greedy+logprobs5": SamplingParams(temperature=0, logprobs=5),
        "seeded temperature": SamplingParams(temperature=0.8, seed=1),
    }
    if grammar is not None:
        out["greedy+json_schema"] = SamplingParams(temperature=0, grammar=grammar)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--grammar-model", default="smollm2-135m-instruct",
                    help="built-in model whose tokenizer the grammar case uses ('' to skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    grammar, model_dir = None, None
    if args.grammar_model:
        from engine.guided import grammar_for
        from models.builtin import builtin_model_dir

        model_dir = str(builtin_model_dir(args.grammar_model))
        grammar = grammar_for("json_schema", SCHEMA)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=g)
    batches = {}
    for name, p in cases(grammar).items():
        seqs = []
        for i in range(args.batch):
            s = Sequence(f"{name}-{i}", torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist(), p)
            if p.grammar is None:  # a grammar's matcher replays the output: keep it valid
                s.output_token_ids = torch.randint(0, args.vocab, (args.output,), generator=g).tolist()
            seqs.append(s)
        batches[name] = seqs
    sampler = Sampler(0, model_dir)
    times: dict[str, list[float]] = {name: [] for name in batches}
    for name, seqs in batches.items():
        sampler.sample(logits, seqs)  # warm-up (grammar matchers built here)
    for _ in range(args.reps):
        for name, seqs in batches.items():
            t0 = time.perf_counter()
            sampler.sample(logits, seqs)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["greedy"])
    rows = [{"case": name, "ms": statistics.median(ts) * 1e3, "vs_greedy": statistics.median(ts) / base}
            for name, ts in times.items()]
    if args.json:
        print(json.dumps({"batch": args.batch, "vocab": args.vocab, "rows": rows}, indent=1))
        return
    print(f"batch {args.batch}, vocab {args.vocab}, {args.prompt}+{args.output} tokens per sequence")
    for r in rows:
        print(f"  {r['case']:<24} {r['ms']:8.2f} ms  x{r['vs_greedy']:.2f}")


if __name__ == "__main__":
    main()
