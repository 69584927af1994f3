"""How a prompt's KV travels across nodes: a codec pinned in the manifest, or chosen per
chunk by the adaptive controller from the measured link throughput, the codecs' measured
size and speed on this model's KV, the prefill speed and the request's budget.

The prefill worker owns one ``TransferPolicy``; it feeds it measurements (``observe_*``)
and asks it for a ``planner`` per request (``kvtransfer.stream`` calls the planner once
the prompt's first KV exists).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvtransfer.adaptive import (LEVELS, AdaptiveController, CodecOption, expected_quality_loss, option_label,
                                 parse_label, rank, strongest_within, within_floor)
from kvtransfer.stream import Planner, StreamPlan

# What the adaptive controller may choose from, least lossy first (the levels of the
# lossy codec up to its strongest allowed level are appended).
ADAPTIVE_BASE = ["none", "lossless", "int8"]
# Chunks per prompt at most (planning is quadratic in the chunk count).
MAX_CHUNKS = 32
# Until a worker has profiled the codecs on its model's KV (it does so before serving):
# size vs 16-bit KV and single-core MB/s each way, from benchmarks.codec_bench on the
# trained tiny Llama's bf16 KV (session 1 figures); kvtc sizes from benchmarks.kv_quality on
# SmolLM2-135M's bf16 KV (benchmarks/results/2026-12-06-kv-quality, session 9; speeds: the
# order of benchmarks.codec_speed's per-layer figures).
DEFAULT_PROFILE = {"none": (1.0, 5e9, 5e9), "lossless": (0.75, 0.9e9, 1.2e9), "int8": (0.53, 0.46e9, 1.6e9),
                   "cachegen:0": (0.35, 1.6e8, 0.8e8), "cachegen:1": (0.27, 1.6e8, 0.86e8),
                   "cachegen:2": (0.21, 1.7e8, 1.0e8), "cachegen:3": (0.15, 1.7e8, 1.1e8),
                   "cachegen:4": (0.12, 1.7e8, 1.2e8), "cachegen:5": (0.094, 1.7e8, 1.3e8),
                   **{f"kvtc:{lv}": (1 / x, 1.2e8, 1.2e8)
                      for lv, x in enumerate((3.21, 3.64, 4.09, 4.58, 5.12, 5.84, 6.88, 8.27))}}


@dataclass
class PolicySpec:
    # "none" | "lossless" | "int8" | "cachegen" | "kvtc" (pinned) or "adaptive".
    codec: str = "none"
    # cachegen / kvtc: its level (None: the strongest within max_quality_loss); adaptive:
    # the strongest level of adaptive_lossy it may use (None: all).
    level: int | None = None
    # Tokens per chunk (a chunk is coded independently; adaptive picks per chunk).
    chunk_tokens: int = 512
    # adaptive: may send a suffix as tokens for the decode worker to recompute.
    allow_recompute: bool = True
    # Seconds from a request's arrival at the prefill worker by which its KV should have
    # landed at the decode worker (adaptive's budget).
    budget_s: float = 1.0
    # The largest expected perplexity increase (fraction, 0.01 = 1%) an option may cost;
    # adaptive never chooses an option above it, whatever the budget; a pinned codec
    # without a level takes its strongest level within it.
    max_quality_loss: float = 0.01
    # adaptive: the lossy codec whose levels it chooses from ("cachegen" or "kvtc").
    adaptive_lossy: str = "cachegen"
    # Measured expected quality loss per option label (a kvtc calibration's stored
    # per-level costs, ``KVTCCalibration.costs()``); QUALITY_LOSS for the rest.
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def lossy(self) -> str | None:
        """The lossy codec family in use, if any."""
        name = self.adaptive_lossy if self.codec == "adaptive" else self.codec
        return name if name in LEVELS else None

    def uses_kvtc(self) -> bool:
        return self.lossy == "kvtc"

    def labels(self) -> list[str]:
        if self.codec == "adaptive":
            top = LEVELS[self.adaptive_lossy] - 1 if self.level is None else self.level
            return ADAPTIVE_BASE + [option_label(self.adaptive_lossy, lv) for lv in range(top + 1)]
        if self.codec in LEVELS:
            level = (strongest_within(self.codec, self.max_quality_loss, self.measured) if self.level is None
                     else self.level)
            return [option_label(self.codec, level)]
        return [self.codec]

    def check_pinned(self) -> None:
        """A pinned lossy level whose expected cost is above max_quality_loss: ValueError."""
        if self.codec in LEVELS:
            (label,) = self.labels()
            cost = expected_quality_loss(*parse_label(label), self.measured)
            if cost > self.max_quality_loss:
                raise ValueError(f"kv_transfer: {label} is expected to cost {100 * cost:.2f}% perplexity on this "
                                 f"model, above max_quality_loss {self.max_quality_loss:g}; allowed: a codec level "
                                 "within it (codec: adaptive picks only such levels; kvtc's are cheaper than "
                                 "cachegen's on real models), or a higher kv_transfer.max_quality_loss")


class TransferPolicy:
    def __init__(self, spec: PolicySpec, options: list[CodecOption] | None = None,
                 prefill_s_per_token: float = 1e-4, default_bps: float = 1.25e9) -> None:
        self.spec = spec
        self.adaptive = spec.codec == "adaptive"
        self.s_per_token = prefill_s_per_token
        measured = bool(options)
        self.controller = (AdaptiveController(self._default_options() if not options else
                                              within_floor(options, spec.max_quality_loss),
                                              prefill_s_per_token, default_bps)
                           if self.adaptive else None)
        # Where the adaptive options' figures come from: "default" (DEFAULT_PROFILE, the
        # built-in constants) until the worker measured them on its model ("measured");
        # None when the codec is pinned (nothing to choose). profile_error says why a
        # start-up measurement failed.
        self.profile: str | None = ("measured" if measured else "default") if self.adaptive else None
        self.profile_error: str | None = None

    def _default_options(self) -> list[CodecOption]:
        return within_floor([CodecOption(*parse_label(lb), *DEFAULT_PROFILE[lb], rank(*parse_label(lb)),
                                         expected_quality_loss(*parse_label(lb), self.spec.measured))
                             for lb in self.spec.labels()], self.spec.max_quality_loss)

    def set_costs(self, measured: dict[str, float]) -> None:
        """Expected quality loss per option label as measured for this model (a kvtc
        calibration's per-level costs): a pinned codec's default level and the adaptive
        options within the floor follow them. ValueError when a pinned level is above
        the floor."""
        self.spec.measured = dict(measured)
        self.spec.check_pinned()
        if self.controller is not None and self.profile != "measured":
            self.controller.options = sorted(self._default_options(), key=lambda o: o.lossiness)

    def set_measured(self, options: list[CodecOption]) -> None:
        """The options as measured on this worker's model (replacing DEFAULT_PROFILE)."""
        assert self.controller is not None
        self.controller.options = sorted(within_floor(options, self.spec.max_quality_loss),
                                         key=lambda o: o.lossiness)
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
