"""How a prompt's KV travels across nodes: a codec pinned in the manifest, or chosen per
chunk by the adaptive controller from the measured link throughput, the codecs' measured
size and speed on this model's KV, the prefill speed and the request's budget.

The prefill worker owns one ``TransferPolicy``; it feeds it measurements (``observe_*``)
and asks it for a ``planner`` per request (``kvtransfer.stream`` calls the planner once
the prompt's first KV exists).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kvtransfer.adaptive import AdaptiveController, CodecOption, rank, option_label, parse_label
from kvtransfer.stream import Planner, StreamPlan

# What the adaptive controller may choose from, least lossy first (cachegen levels up to
# max_level are appended).
ADAPTIVE_BASE = ["none", "lossless", "int8"]
# Chunks per prompt at most (planning is quadratic in the chunk count).
MAX_CHUNKS = 32
# Until a worker has profiled the codecs on its model's KV (it does so before serving):
# size vs 16-bit KV and single-core MB/s each way, from benchmarks.codec_bench on the
# trained tiny Llama's bf16 KV (session 1 figures).
DEFAULT_PROFILE = {"none": (1.0, 5e9, 5e9), "lossless": (0.75, 0.9e9, 1.2e9), "int8": (0.53, 0.46e9, 1.6e9),
                   "cachegen:0": (0.35, 1.6e8, 0.8e8), "cachegen:1": (0.27, 1.6e8, 0.86e8),
                   "cachegen:2": (0.21, 1.7e8, 1.0e8), "cachegen:3": (0.15, 1.7e8, 1.1e8),
                   "cachegen:4": (0.12, 1.7e8, 1.2e8), "cachegen:5": (0.094, 1.7e8, 1.3e8)}


@dataclass
class PolicySpec:
    # "none" | "lossless" | "int8" | "cachegen" (pinned) or "adaptive".
    codec: str = "none"
    # cachegen: its level; adaptive: the strongest cachegen level it may use.
    level: int | None = None
    # Tokens per chunk (a chunk is coded independently; adaptive picks per chunk).
    chunk_tokens: int = 512
    # adaptive: may send a suffix as tokens for the decode worker to recompute.
    allow_recompute: bool = True
    # Seconds from a request's arrival at the prefill worker by which its KV should have
    # landed at the decode worker (adaptive's budget).
    budget_s: float = 1.0

    def labels(self) -> list[str]:
        if self.codec == "adaptive":
            top = 5 if self.level is None else self.level
            return ADAPTIVE_BASE + [option_label("cachegen", lv) for lv in range(top + 1)]
        if self.codec == "cachegen":
            return [option_label("cachegen", 3 if self.level is None else self.level)]
        return [self.codec]


class TransferPolicy:
    def __init__(self, spec: PolicySpec, options: list[CodecOption] | None = None,
                 prefill_s_per_token: float = 1e-4, default_bps: float = 1.25e9) -> None:
        self.spec = spec
        self.adaptive = spec.codec == "adaptive"
        self.s_per_token = prefill_s_per_token
        measured = bool(options)
        if self.adaptive and not options:
            options = [CodecOption(*parse_label(lb), *DEFAULT_PROFILE[lb], rank(*parse_label(lb)))
                       for lb in spec.labels()]
        self.controller = (AdaptiveController(options or [], prefill_s_per_token, default_bps)
                           if self.adaptive else None)
        # Where the adaptive options' figures come from: "default" (DEFAULT_PROFILE, the
        # built-in constants) until the worker measured them on its model ("measured");
        # None when the codec is pinned (nothing to choose). profile_error says why a
        # start-up measurement failed.
        self.profile: str | None = ("measured" if measured else "default") if self.adaptive else None
        self.profile_error: str | None = None

    def set_measured(self, options: list[CodecOption]) -> None:
        """The options as measured on this worker's model (replacing DEFAULT_PROFILE)."""
        assert self.controller is not None
        self.controller.options = sorted(options, key=lambda o: o.lossiness)
        self.controller.recompute_s_per_token = self.s_per_token
        self.profile, self.profile_error = "measured", None

    def profile_status(self) -> dict[str, str | None]:
        return {"kv_codec_profile": self.profile, "kv_codec_profile_error": self.profile_error}

    # -- measurements -----------------------------------------------------------------
    def observe_prefill(self, tokens: int, seconds: float, alpha: float = 0.3) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        self.s_per_token = (1 - alpha) * self.s_per_token + alpha * seconds / tokens
        if self.controller is not None:
            self.controller.recompute_s_per_token = self.s_per_token

    def observe_link(self, src: str, dst: str | None, nbytes: int, seconds: float) -> None:
        if self.controller is not None and dst is not None:
            self.controller.observe(src, dst, nbytes, seconds)

    def observe_encode(self, label: str, raw: int, encoded: int, seconds: float) -> None:
        if self.controller is not None:
            try:
                self.controller.option(label).observe(raw, encoded, seconds)
            except KeyError:
                pass

    def link_bps(self, src: str, dst: str) -> float | None:
        return None if self.controller is None else self.controller.link(src, dst).bps

    # -- planning ---------------------------------------------------------------------
    def chunk_tokens(self, num_tokens: int) -> int:
        return max(self.spec.chunk_tokens, -(-num_tokens // MAX_CHUNKS))

    def planner(self, src: str, dst: str, bytes_per_token: int, arrival: float | None = None) -> Planner:
        """A planner for one request; ``arrival`` (time.monotonic) starts its budget."""
        arrival = time.monotonic() if arrival is None else arrival

        def plan(num_tokens: int) -> StreamPlan:
            c = self.chunk_tokens(num_tokens)
            ends = list(range(c, num_tokens, c)) + [num_tokens]
            tokens = [e - (ends[i - 1] if i else 0) for i, e in enumerate(ends)]
            if self.controller is None:
                return StreamPlan([self.spec.labels()[0]] * len(ends), c)
            budget = self.spec.budget_s - (time.monotonic() - arrival)
            ready = [e * self.s_per_token for e in ends]
            p = self.controller.plan(src, dst, [t * bytes_per_token for t in tokens], tokens, budget,
                                     ready_s=ready, allow_recompute=self.spec.allow_recompute)
            return StreamPlan(p.choices, c, p.predicted_s, p.meets_budget)

        return plan
