"""What the benchmark sends and when: open-loop arrival times and request shapes.

Arrivals are Poisson (exponential gaps) or gamma with a burstiness factor, the way
vLLM's ``bench serve`` defines it: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)),
so the mean rate stays ``rate`` and burstiness 1 is Poisson (< 1 burstier, > 1 smoother).

Workloads are synthetic length distributions (``chat``, ``summarize``, ``generate``) or a
JSONL trace with one object a line: ``{"arrival_s", "prompt" | "prompt_tokens", "output_tokens"}``.
Synthetic prompts are lists of random token ids, so their lengths are exact and no two
prompts share a prefix (no accidental prefix-cache hits).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


class WorkloadError(ValueError):
    """A workload or trace problem; the message names the flag or the file and line."""


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float          # seconds after the run starts at which the request is sent
    prompt: str | list[int]   # text, or token ids (exact length)
    prompt_tokens: int        # prompt length in tokens (for text prompts: as given by the trace, else 0)
    output_tokens: int        # tokens to generate (sent as max_tokens with ignore_eos)


@dataclass(frozen=True)
class LengthRange:
    """Uniform integer lengths in [lo, hi] (tokens)."""

    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.lo, self.hi + 1, size=n)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LengthRange   # prompt tokens
    output: LengthRange   # output tokens


# Sized for the demo model (context 8192, a few thousand KV tokens per worker, CPU only).
WORKLOADS: dict[str, Workload] = {
    "chat": Workload("chat", LengthRange(32, 128), LengthRange(16, 64)),
    "summarize": Workload("summarize", LengthRange(768, 1280), LengthRange(8, 24)),
    "generate": Workload("generate", LengthRange(16, 64), LengthRange(128, 256)),
}


def parse_length(text: str, flag: str) -> LengthRange:
    """'N' or 'LO:HI' (tokens, >= 1)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise WorkloadError(f"{flag}: expected N or LO:HI (integers), found {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise WorkloadError(f"{flag}: expected N or LO:HI with 1 <= LO <= HI, found {text!r}")
    return LengthRange(parts[0], parts[1])


def arrival_times(rate: float, duration_s: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Open-loop send times in [0, duration_s) at mean `rate` requests/s."""
    if rate <= 0 or not math.isfinite(rate):
        raise WorkloadError(f"rate must be a positive number, found {rate}")
    if burstiness <= 0:
        raise WorkloadError(f"burstiness must be > 0, found {burstiness}")
    rng = np.random.default_rng(seed)
    out: list[float] = []
    t = 0.0
    chunk = max(16, int(rate * duration_s * 1.5))
    while True:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=chunk)
        for g in gaps:
            t += float(g)
            if t >= duration_s:
                return out
            out.append(t)


def synthetic(workload: Workload, rate: float, duration_s: float, seed: int,
              burstiness: float = 1.0, vocab_size: int = 1024) -> list[RequestSpec]:
    """Requests of a synthetic workload at one rate. The same (seed, rate) gives the same list."""
    times = arrival_times(rate, duration_s, seed, burstiness)
    rng = np.random.default_rng([seed, 1])
    n = len(times)
    plens = workload.prompt.sample(rng, n)
    olens = workload.output.sample(rng, n)
    # Ids from 3 up: skips the usual special tokens (pad/bos/eos) of small vocabularies.
    low = 3 if vocab_size > 16 else 0
    out = []
    for t, p, o in zip(times, plens, olens):
        ids = rng.integers(low, vocab_size, size=int(p)).tolist()
        out.append(RequestSpec(t, ids, int(p), int(o)))
    return out


# -- traces -----------------------------------------------------------------------------

def _positive_int(obj: dict[str, object], key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise WorkloadError(f"{where}: '{key}' must be an integer >= 1, found {v!r}")
    return v


def parse_trace_line(line: str, where: str, vocab_size: int, seed: int) -> RequestSpec:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    t = obj.get("arrival_s")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise WorkloadError(f"{where}: 'arrival_s' must be a number >= 0, found {t!r}")
    out_tokens = _positive_int(obj, "output_tokens", where)
    if ("prompt" in obj) == ("prompt_tokens" in obj):
        raise WorkloadError(f"{where}: give exactly one of 'prompt' (text or token ids) "
                            "or 'prompt_tokens' (a length)")
    if "prompt_tokens" in obj:
        n = _positive_int(obj, "prompt_tokens", where)
        rng = np.random.default_rng([seed, int(t * 1e6), n])
        ids = rng.integers(3 if vocab_size > 16 else 0, vocab_size, size=n).tolist()
        return RequestSpec(float(t), ids, n, out_tokens)
    prompt = obj["prompt"]
    if isinstance(prompt, str) and prompt:
        return RequestSpec(float(t), prompt, 0, out_tokens)
    if (isinstance(prompt, list) and prompt
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in prompt)):
        return RequestSpec(float(t), list(prompt), len(prompt), out_tokens)
    raise WorkloadError(f"{where}: 'prompt' must be a non-empty string or a list of token ids "
                        f"(integers >= 0), found {str(prompt)[:40]!r}")


def load_trace(path: str | Path, vocab_size: int = 1024, seed: int = 0) -> list[RequestSpec]:
    """All requests of a JSONL trace, sorted by arrival. Blank lines are skipped; any other
    malformed line is an error naming `path:line`."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"--trace: {p} does not exist")
    out = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                out.append(parse_trace_line(line, f"{p}:{i}", vocab_size, seed))
    if not out:
        raise WorkloadError(f"--trace: {p} has no requests")
    return sorted(out, key=lambda r: r.arrival_s)


def trace_rate(trace: list[RequestSpec]) -> float:
    """Mean arrival rate of a trace (requests/s); a trace whose requests all arrive at 0
    counts as one second long."""
    span = trace[-1].arrival_s - trace[0].arrival_s
    return len(trace) / span if span > 0 else float(len(trace))


def replay(trace: list[RequestSpec], rate: float | None, duration_s: float) -> list[RequestSpec]:
    """The trace's requests within the duration, its times rescaled to a mean `rate`
    (None: as recorded). Times start at the first request."""
    t0 = trace[0].arrival_s
    scale = 1.0 if rate is None else trace_rate(trace) / rate
    out = []
    for r in trace:
        t = (r.arrival_s - t0) * scale
        if t >= duration_s:
            break
        out.append(replace(r, arrival_s=t))
    return out
