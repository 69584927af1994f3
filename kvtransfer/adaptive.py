"""Bandwidth- and SLO-adaptive choice of how each KV chunk travels (CacheGen, SIGCOMM
2024, section 5: pick the encoding level per chunk from the measured throughput so that
the context arrives within the budget; when no level can, send the tokens and recompute).

Pure logic: the controller keeps a throughput estimate per link and a profile per option
(size ratio and codec speed); ``plan`` assigns an option to each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RECOMPUTE = "recompute"


@dataclass(frozen=True)
class CodecOption:
    # Codec name and options as get_codec takes them, e.g. ("cachegen", level=2).
    name: str
    level: int | None
    # Encoded bytes / raw bytes of the model's KV.
    size_ratio: float
    # Raw KV bytes per second that one core encodes and decodes.
    encode_bps: float
    decode_bps: float
    # Quality rank: 0 is exact; larger loses more.
    lossiness: int

    @property
    def label(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    def seconds(self, raw_bytes: int, link_bps: float) -> float:
        return (raw_bytes / self.encode_bps + raw_bytes * self.size_ratio / link_bps
                + raw_bytes / self.decode_bps)


@dataclass
class LinkEstimate:
    """EWMA of measured throughput (bytes/s) of one sender->receiver link."""

    bps: float
    alpha: float = 0.3
    samples: int = 0

    def observe(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes <= 0:
            return
        x = nbytes / seconds
        self.bps = x if self.samples == 0 else (1 - self.alpha) * self.bps + self.alpha * x
        self.samples += 1


@dataclass
class ChunkPlan:
    # Option label per chunk ("none", "cachegen:2", ..., or "recompute").
    choices: list[str]
    # Predicted seconds to land all chunks.
    predicted_s: float
    # Whether the prediction fits the budget.
    meets_budget: bool


@dataclass
class AdaptiveController:
    options: list[CodecOption]
    # Seconds the receiver needs to recompute one token's KV (prefill throughput).
    recompute_s_per_token: float
    # Throughput assumed for a link never measured.
    default_bps: float = 1.25e9
    links: dict[tuple[str, str], LinkEstimate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = sorted(self.options, key=lambda o: o.lossiness)
        if not self.options:
            raise ValueError("AdaptiveController needs at least one codec option")

    def link(self, src: str, dst: str) -> LinkEstimate:
        return self.links.setdefault((src, dst), LinkEstimate(self.default_bps))

    def observe(self, src: str, dst: str, nbytes: int, seconds: float) -> None:
        self.link(src, dst).observe(nbytes, seconds)

    def _stages(self, i: int, k: int, chunk_bytes: list[int], chunk_tokens: list[int],
                bps: float) -> tuple[float, float, float]:
        """(encode, network, decode-or-recompute) seconds of chunk i at option k."""
        if k == len(self.options):
            return 0.0, 0.0, chunk_tokens[i] * self.recompute_s_per_token
        o, b = self.options[k], chunk_bytes[i]
        return b / o.encode_bps, b * o.size_ratio / bps, b / o.decode_bps

    def predict(self, idx: list[int], chunk_bytes: list[int], chunk_tokens: list[int],
                bps: float) -> float:
        """Chunks pipeline through encode -> link -> decode: the slowest stage's total,
        plus filling and draining the pipeline (first chunk's encode, last's decode)."""
        if not idx:
            return 0.0
        st = [self._stages(i, k, chunk_bytes, chunk_tokens, bps) for i, k in enumerate(idx)]
        busiest = max(sum(x[j] for x in st) for j in range(3))
        return busiest + st[0][0] + st[-1][2]

    def plan(self, src: str, dst: str, chunk_bytes: list[int], chunk_tokens: list[int],
             budget_s: float) -> ChunkPlan:
        """Least lossy option per chunk such that all chunks land within budget_s.

        Greedy: every chunk starts at the least lossy option; while the prediction is over
        budget, the chunk whose next step (a lossier level, finally recomputing it) saves
        the most time takes that step."""
        bps = self.link(src, dst).bps
        idx = [0] * len(chunk_bytes)
        total = self.predict(idx, chunk_bytes, chunk_tokens, bps)
        while total > budget_s:
            best, best_total = -1, total
            for i in range(len(idx)):
                if idx[i] < len(self.options):
                    idx[i] += 1
                    t = self.predict(idx, chunk_bytes, chunk_tokens, bps)
                    idx[i] -= 1
                    if t < best_total:
                        best, best_total = i, t
            if best < 0:
                break
            idx[best] += 1
            total = best_total
        labels = [RECOMPUTE if k == len(self.options) else self.options[k].label for k in idx]
        return ChunkPlan(labels, total, total <= budget_s)
