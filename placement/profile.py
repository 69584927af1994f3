"""`splitserve profile`: run the engine on this machine and fit the latency model's
coefficients (DistServe's form) for the planner and simulator.

The engine is driven the way the workers drive it: prompts go through the scheduler with
the pools' token budget, so long prompts are chunked and several prompts share a step,
and every step is timed with the batch it actually ran (chunk lengths and the context
cached before each chunk). Prefill is fitted on pure prefill steps, decode on pure decode
steps at the batch sizes and contexts the workload reaches; mixed steps (decodes beside a
chunk, what colocated workers run) are only checked. The chunked-attention form
(``placement.latency.chunk_attention_work``) is this engine's masked dense attention, or
whichever of the two fits better.

Cost. Every decode sample needs its batch's KV first, so the full grid (batches 1-16 x
contexts 64-1536) prefills ~97k tokens before it times a decode step: on the real model
(SmolLM2-135M, fp32, one thread, ~3-6 ms a prompt token on this machine) that alone is
5-10 minutes, which is why `splitserve profile deploy/manifests/demo.yaml` did not finish
in 7. The decode model is linear (``a + b * batch + c * total_context``), so a few corners
of the (batch, context) range pin it as well as the grid does and the fit interpolates in
between: ``quick_shapes`` takes those corners and the prefill sets the manifest's workload
reaches (~5k prompt tokens for the demo's default workload range up to 1280 tokens), and
``cached_profile`` keeps a profile per (model files, dtype, threads, shapes) under
``~/.cache/splitserve/profiles``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from placement.latency import (ATTENTION_KINDS, Coeffs, LatencyModel, fit_decode, fit_prefill_steps)

# (chunk lengths, context before each chunk, seconds)
Step = tuple[list[int], list[int], float]

PREFILL_SETS: tuple[tuple[int, ...], ...] = (
    (32,), (128,), (384,), (512,), (768,), (1024,), (1280,), (1536,),
    (256, 256), (100, 900), (768, 512), (1024, 1024), (128, 256, 1000), (64, 64, 64, 64))
DECODE_BATCHES = (1, 2, 4, 8, 16)
DECODE_CONTEXTS = (64, 512, 1024, 1536)
# Bump when the measurement or the fit changes: cached profiles of older versions are ignored.
PROFILE_VERSION = 1


def quick_shapes(max_context: int, max_batch: int = 16, budget: int = 512
                 ) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, int], ...]]:
    """(prefill sets, decode (batch, context) points) covering prompts and contexts up to
    max_context and decode batches up to max_batch with few samples: single prompts of 1/4,
    1/2 and all of max_context, batches of two and four, and the sets of PREFILL_SETS that fit,
    and decode corners: small and large batch at a short context, small batch at the
    longest, a middle batch at half of it (the decode fit is linear in batch and context,
    so these pin it; more samples at large batch x context only cost prefill time)."""
    big = max(8, max_context)
    sets = {(min(32, big),), (big // 4,), (big // 2,), (big,), (big // 2, big // 2), (big // 4,) * 4,
            (big // 8, big // 2)}
    sets |= {s for s in PREFILL_SETS if max(s) <= max_context and sum(s) <= max(budget, max_context) * 2}
    sets = tuple(sorted(sets, key=lambda x: (sum(x), x)))
    short = min(64, max_context)
    mid_b = max(1, max_batch // 2)
    points = {(1, short), (max_batch, short), (1, max_context), (mid_b, max(short, max_context // 2)),
              (max(1, max_batch // 4), max(short, max_context // 4))}
    return sets, tuple(sorted(points))


class _Recorder:
    """Times engine steps and records the batch each one ran."""

    def __init__(self, eng: Any) -> None:
        self.eng = eng
        self.steps: list[Step] = []
        self._shape: tuple[list[int], list[int]] = ([], [])
        orig = eng.scheduler.schedule

        def schedule() -> Any:
            b = orig()
            self._shape = (list(b.num_tokens), [s.num_computed_tokens for s in b.seqs])
            return b

        eng.scheduler.schedule = schedule

    def step(self) -> Step | None:
        t0 = time.perf_counter()
        self.eng.step()
        dt = time.perf_counter() - t0
        ns, cs = self._shape
        if not ns:
            return None
        s = (ns, cs, dt)
        self.steps.append(s)
        return s


def _kind(ns: list[int]) -> str:
    if all(n == 1 for n in ns):
        return "decode"
    return "prefill" if all(n > 1 for n in ns) else "mixed"


def _median_by_shape(steps: Iterable[Step]) -> list[Step]:
    """One sample per distinct batch shape (the median time): this machine is shared and
    single steps are noisy."""
    by: dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = {}
    for ns, cs, t in steps:
        by.setdefault((tuple(ns), tuple(cs)), []).append(t)
    return [(list(k[0]), list(k[1]), statistics.median(v)) for k, v in by.items()]


def _decode_sample(ns: list[int], cs: list[int], t: float) -> tuple[int, int, float]:
    return (len(ns), sum(c + 1 for c in cs), t)


def fit_steps(steps: list[Step], attention: str | None = None) -> dict[str, Any]:
    """Fit the latency model on timed steps; returns the model's fields and its errors.
    attention: the chunked-attention form, or None to keep whichever fits better."""
    pre = _median_by_shape(s for s in steps if _kind(s[0]) == "prefill")
    dec_raw = [_decode_sample(*s) for s in steps if _kind(s[0]) == "decode"]
    # Decode shapes: median per (batch, context rounded to 64).
    dm: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for b, c, t in dec_raw:
        dm.setdefault((b, c // 64), []).append((c, t))
    dec = [(b, int(statistics.median(c for c, _ in v)), statistics.median(t for _, t in v))
           for (b, _), v in dm.items()]
    best: dict[str, Any] | None = None
    for kind in ([attention] if attention else ATTENTION_KINDS):
        p = fit_prefill_steps(pre, kind)
        m = LatencyModel(p, Coeffs(0, 0, 0), attention=kind)
        err = [abs(m.mixed_s(ns, cs, 0, 0) - t) / t for ns, cs, t in pre]
        cand = {"attention": kind, "prefill": p, "err": err}
        if best is None or statistics.median(err) < statistics.median(best["err"]):
            best = cand
    assert best is not None
    d = fit_decode(dec)
    model = LatencyModel(best["prefill"], d, attention=best["attention"])
    err_d = [abs(model.decode_s(b, c) - t) / t for b, c, t in dec]
    mixed = _median_by_shape(s for s in steps if _kind(s[0]) == "mixed")
    err_m = []
    for ns, cs, t in mixed:
        chunks = [(n, c) for n, c in zip(ns, cs) if n > 1]
        decs = [c for n, c in zip(ns, cs) if n == 1]
        pred = model.mixed_s([n for n, _ in chunks], [c for _, c in chunks], len(decs), sum(c + 1 for c in decs))
        err_m.append(abs(pred - t) / t)
    return {"prefill": list(model.prefill.as_tuple()), "decode": list(model.decode.as_tuple()),
            "attention": model.attention,
            "median_rel_error_prefill": statistics.median(best["err"]), "max_rel_error_prefill": max(best["err"]),
            "median_rel_error_decode": statistics.median(err_d), "max_rel_error_decode": max(err_d),
            "median_rel_error_mixed": statistics.median(err_m) if err_m else None,
            "samples": {"prefill_shapes": len(pre), "decode_shapes": len(dec), "mixed_shapes": len(mixed),
                        "steps": len(steps)}}


def profile_engine(model_dir: str | Path, dtype: str = "float32", threads: int = 1,
                   repeats: int = 3, max_batched_tokens: int = 512,
                   prefill_sets: tuple[tuple[int, ...], ...] = PREFILL_SETS,
                   decode_batches: tuple[int, ...] = DECODE_BATCHES,
                   decode_contexts: tuple[int, ...] = DECODE_CONTEXTS, keep_steps: bool = False,
                   attention: str | None = "dense",
                   decode_points: tuple[tuple[int, int], ...] | None = None) -> dict[str, object]:
    """Profile this repo's engine. attention defaults to "dense": engine/attention.py
    applies the causal mask to each chunk's full score matrix (n x (ctx + n)); None fits
    both forms and keeps the better (on a busy shared machine that choice is noisy).
    decode_points: the (batch, context) pairs to time decode at; default the grid
    decode_batches x decode_contexts."""
    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    torch.set_num_threads(threads)
    points = decode_points or tuple((b, c) for b in decode_batches for c in decode_contexts)
    need = max(max(b * (c + repeats + 4) for b, c in points), 4 * 2048)
    eng = LLMEngine.from_model_dir(model_dir, dtype=dtype, num_blocks=need // 16 + 64, block_size=16,
                                   scheduler_config=SchedulerConfig(max_num_batched_tokens=max_batched_tokens,
                                                                    max_num_seqs=256, max_model_len=8192),
                                   enable_prefix_caching=False)
    rec = _Recorder(eng)
    gen = torch.Generator().manual_seed(0)
    counter = iter(range(10**9))

    def prompt(n: int) -> list[int]:
        return torch.randint(3, 1000, (n,), generator=gen).tolist()

    def drain() -> None:
        while eng.has_work:
            rec.step()

    # Warm-up (allocator, first-call paths): not recorded.
    eng.add_request("warm", prompt(600), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while eng.has_work:
        eng.step()
    for _ in range(repeats):
        for lens in prefill_sets:
            for n in lens:
                eng.add_request(f"p{next(counter)}", prompt(n), SamplingParams(temperature=0, max_tokens=1))
            drain()
    for batch, ctx in points:
        # Long outputs, so that the first sequences keep decoding (beside the later
        # ones' chunks: mixed steps) until all have their first token; then `repeats`
        # steps of the whole batch decoding, and the batch is dropped.
        ids = [f"d{next(counter)}" for _ in range(batch)]
        seqs = [eng.add_request(rid, prompt(ctx), SamplingParams(temperature=0, max_tokens=8192 - ctx - 1,
                                                                 ignore_eos=True))
                for rid in ids]
        while any(not s.output_token_ids for s in seqs):
            rec.step()
        for _ in range(repeats):
            rec.step()
        for rid in ids:
            eng.abort(rid)
    out = fit_steps(rec.steps, attention)
    out.update({"threads": threads, "dtype": dtype, "max_batched_tokens": max_batched_tokens})
    if keep_steps:
        out["steps"] = rec.steps
    return out


def _model_fingerprint(model_dir: Path) -> dict[str, Any]:
    files = {}
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            files[f.name] = [st.st_size, int(st.st_mtime)]
    cfg = model_dir / "config.json"
    return {"dir": str(model_dir.resolve()), "files": files,
            "config": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.exists() else None}


def cache_dir() -> Path:
    from models.paths import cache_root

    return cache_root() / "profiles"


def cached_profile(model_dir: str | Path, dtype: str = "float32", threads: int = 1, *, refresh: bool = False,
                   **kwargs: Any) -> tuple[dict[str, Any], Path, bool]:
    """profile_engine's result for these model files and arguments, from the cache when
    one was measured before (unless refresh). Returns (profile, cache file, hit)."""
    model_dir = Path(model_dir)
    key = json.dumps({"v": PROFILE_VERSION, "model": _model_fingerprint(model_dir), "dtype": dtype,
                      "threads": threads, **{k: v for k, v in sorted(kwargs.items())}}, sort_keys=True, default=list)
    path = cache_dir() / f"{model_dir.name}-{dtype}-t{threads}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not refresh and path.exists():
        try:
            return json.loads(path.read_text()), path, True
        except (OSError, ValueError):
            pass  # a torn or unreadable entry: measure again
    out = profile_engine(model_dir, dtype, threads, **kwargs)
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out["model_fingerprint"] = _model_fingerprint(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    return out, path, False


def find_cached_profile(model_dir: str | Path, dtype: str = "float32", threads: int = 1) -> dict[str, Any] | None:
    """The newest cached profile of these very model files, dtype and thread count (any
    shapes), or None: what the autoscaler's modelled capacity reads without measuring."""
    model_dir = Path(model_dir)
    fp = _model_fingerprint(model_dir)
    found = sorted(cache_dir().glob(f"{model_dir.name}-{dtype}-t{threads}-*.json"), key=lambda f: -f.stat().st_mtime)
    for f in found:
        try:
            prof = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if prof.get("model_fingerprint") == fp:
            return prof  # type: ignore[no-any-return]
    return None


def latency_model(profile: dict[str, Any]) -> LatencyModel:
    return LatencyModel(Coeffs(*profile["prefill"]), Coeffs(*profile["decode"]),
                        attention=str(profile.get("attention", "causal")))


def load_profile(path: str | Path) -> LatencyModel:
    return latency_model(json.loads(Path(path).read_text()))
