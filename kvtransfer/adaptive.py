"""Bandwidth- and SLO-adaptive choice of how each KV chunk travels (CacheGen, SIGCOMM
2024, section 5: pick the encoding level per chunk from the measured throughput so that
the context arrives within the budget; when no level can, send the tokens and recompute).

Pure logic: the controller keeps a throughput estimate per link and a profile per option
(size ratio and codec speed, measured on the model's own KV when a worker starts and
refined by every transfer); ``plan`` assigns an option to each chunk. The prediction is
a flow shop: chunk i's KV exists once prefill has computed it (``ready_s``), then it is
encoded, crosses the link and is decoded, each stage one chunk at a time; chunks to
recompute cost the decode worker a prefill of their tokens after the rest has landed.
Recomputation is only ever chosen for a suffix of the prompt: the decode worker imports
the KV of a prefix and computes the rest like a prompt whose prefix was cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RECOMPUTE = "recompute"
# A lossier step must save at least this share of the predicted time: when the budget is
# out of reach, quality is not traded for crumbs.
MIN_GAIN = 0.01


@dataclass
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

    def observe(self, raw_bytes: int, encoded_bytes: int, encode_s: float, alpha: float = 0.2) -> None:
        """Refine the profile with a real encode (EWMA)."""
        if raw_bytes <= 0 or encode_s <= 0:
            return
        self.size_ratio = (1 - alpha) * self.size_ratio + alpha * encoded_bytes / raw_bytes
        self.encode_bps = (1 - alpha) * self.encode_bps + alpha * raw_bytes / encode_s


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
                bps: float, ready_s: list[float] | None = None) -> float:
        """Seconds until every chunk has landed (or been recomputed): a flow shop of
        encode -> link -> decode, chunk i entering once it is ready (ready_s[i], default 0)."""
        enc = net = dec = 0.0
        recompute = 0.0
        for i, k in enumerate(idx):
            e, n, d = self._stages(i, k, chunk_bytes, chunk_tokens, bps)
            if k == len(self.options):
                recompute += d
                continue
            enc = max(enc, ready_s[i] if ready_s else 0.0) + e
            net = max(net, enc) + n
            dec = max(dec, net) + d
        last_ready = ready_s[-1] if ready_s else 0.0
        return max(dec, last_ready) + recompute

    def plan(self, src: str, dst: str, chunk_bytes: list[int], chunk_tokens: list[int],
             budget_s: float, ready_s: list[float] | None = None,
             allow_recompute: bool = True) -> ChunkPlan:
        """Least lossy option per chunk such that all chunks land within budget_s.

        Greedy: every chunk starts at the least lossy option; while the prediction is over
        budget, the chunk whose next step (a lossier level; finally recomputing it, for the
        last chunk not yet recomputed) saves the most time takes that step, if it saves at
        least MIN_GAIN of the total. When nothing meets the budget, the fastest plan found
        is returned with meets_budget False."""
        bps = self.link(src, dst).bps
        top = len(self.options) if allow_recompute else len(self.options) - 1
        idx = [0] * len(chunk_bytes)
        total = self.predict(idx, chunk_bytes, chunk_tokens, bps, ready_s)
        while total > budget_s:
            best, best_total = -1, total
            for i in range(len(idx)):
                if idx[i] >= top:
                    continue
                if idx[i] + 1 == len(self.options) and i + 1 < len(idx) and idx[i + 1] != len(self.options):
                    continue  # recompute only a suffix
                idx[i] += 1
                t = self.predict(idx, chunk_bytes, chunk_tokens, bps, ready_s)
                idx[i] -= 1
                if t < best_total and t < total * (1 - MIN_GAIN):
                    best, best_total = i, t
            if best < 0:
                break
            idx[best] += 1
            total = best_total
        labels = [RECOMPUTE if k == len(self.options) else self.options[k].label for k in idx]
        return ChunkPlan(labels, total, total <= budget_s)

    def option(self, label: str) -> CodecOption:
        for o in self.options:
            if o.label == label:
                return o
        raise KeyError(f"no codec option {label!r}; have {[o.label for o in self.options]}")


def option_label(name: str, level: int | None) -> str:
    return name if level is None else f"{name}:{level}"


def parse_label(label: str) -> tuple[str, int | None]:
    name, _, level = label.partition(":")
    return name, (int(level) if level else None)


# Lossiness ranks: exact first (none before lossless: cheaper on the CPU), then int8,
# then cachegen levels in order.
def _rank(name: str, level: int | None) -> int:
    return {"none": 0, "lossless": 0, "int8": 1}.get(name, 2 + (level or 0))


def profile_options(sample: "torch.Tensor", labels: list[str], repeat: int = 2) -> list[CodecOption]:
    """Measure each option on a sample of the model's KV ([layers, 2, tokens, kvh, hd]):
    size ratio, and encode and decode speed (raw bytes per second, best of ``repeat``)."""
    import time

    from kvtransfer.codec import get_codec

    raw = sample.numel() * sample.element_size()
    out = []
    for label in labels:
        name, level = parse_label(label)
        codec = get_codec(name, **({} if level is None else {"level": level}))
        enc_s = dec_s = float("inf")
        data = b""
        for _ in range(repeat):
            t0 = time.perf_counter()
            data = codec.encode(sample)
            t1 = time.perf_counter()
            codec.decode(data)
            t2 = time.perf_counter()
            enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
        out.append(CodecOption(name, level, len(data) / raw, raw / max(enc_s, 1e-9), raw / max(dec_s, 1e-9),
                               _rank(name, level)))
    return out
