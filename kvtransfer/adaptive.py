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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RECOMPUTE = "recompute"


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
    # Expected perplexity increase (fraction: 0.01 = 1%) on the model's text; options
    # above the policy's quality floor are never chosen (see expected_quality_loss).
    quality_loss: float = 0.0

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

        Candidates in order of loss: every chunk at option 0, 1, ... (uniform), then the
        strongest option with a growing suffix of chunks recomputed. The first candidate
        that meets the budget is refined chunk by chunk: each chunk steps back to less
        lossy options as long as the whole still meets the budget. When no candidate
        meets it, the fastest one is returned with meets_budget False."""
        bps = self.link(src, dst).bps
        n, top = len(chunk_bytes), len(self.options) - 1

        def predict(idx: list[int]) -> float:
            return self.predict(idx, chunk_bytes, chunk_tokens, bps, ready_s)

        candidates = [[k] * n for k in range(top + 1)]
        if allow_recompute:
            candidates += [[top] * (n - j) + [top + 1] * j for j in range(1, n + 1)]
        best, best_t = candidates[0], predict(candidates[0])
        chosen = None
        for idx in candidates:
            t = predict(idx)
            if t <= budget_s:
                chosen = list(idx)
                break
            if t < best_t:
                best, best_t = idx, t
        if chosen is None:
            # Mixed plans can beat every uniform one (the CPU codecs and the link are
            # different bottlenecks): improve the fastest by single-chunk moves.
            chosen, t = self._descend(list(best), best_t, predict, top + 1 if allow_recompute else top,
                                      budget_s)
            if t > budget_s:
                return self._labels(chosen, t, False)
        for i in range(n):
            while chosen[i] > 0:
                if chosen[i] == top + 1 and i + 1 < n and chosen[i + 1] != top + 1:
                    break  # recompute stays a suffix
                chosen[i] -= 1
                if predict(chosen) > budget_s:
                    chosen[i] += 1
                    break
        t = predict(chosen)
        return self._labels(chosen, t, t <= budget_s)

    @staticmethod
    def _descend(idx: list[int], t: float, predict: Callable[[list[int]], float], last: int,
                 budget_s: float) -> tuple[list[int], float]:
        """Best-improvement moves of one chunk to any option 0..last (last is recompute
        when allowed; it stays a suffix), at most len(idx) of them, until the budget is met."""
        n, rc = len(idx), last
        for _ in range(n):
            if t <= budget_s:
                break
            move, move_t = None, t
            for i in range(n):
                old = idx[i]
                for k in range(last + 1):
                    if k == old:
                        continue
                    idx[i] = k
                    if _suffix_ok(idx, rc) and (nt := predict(idx)) < move_t:
                        move, move_t = (i, k), nt
                idx[i] = old
            if move is None:
                break
            idx[move[0]] = move[1]
            t = move_t
        return idx, t

    def _labels(self, idx: list[int], t: float, ok: bool) -> ChunkPlan:
        labels = [RECOMPUTE if k == len(self.options) else self.options[k].label for k in idx]
        return ChunkPlan(labels, t, ok)

    def option(self, label: str) -> CodecOption:
        for o in self.options:
            if o.label == label:
                return o
        raise KeyError(f"no codec option {label!r}; have {[o.label for o in self.options]}")


def _suffix_ok(idx: list[int], rc: int) -> bool:
    """Recompute (index rc) only on a suffix of the chunks."""
    seen = False
    for k in idx:
        if seen and k != rc:
            return False
        seen = seen or k == rc
    return True


def option_label(name: str, level: int | None) -> str:
    return name if level is None else f"{name}:{level}"


def parse_label(label: str) -> tuple[str, int | None]:
    name, _, level = label.partition(":")
    return name, (int(level) if level else None)


# Levels of each lossy codec family (0 finest).
LEVELS = {"cachegen": 6, "kvtc": 8}


# Lossiness ranks: exact first (none before lossless: cheaper on the CPU), then int8,
# then the levels of a lossy codec in order (one lossy family per controller).
def rank(name: str, level: int | None) -> int:
    return {"none": 0, "lossless": 0, "int8": 1}.get(name, 2 + (level or 0))


# Expected perplexity increase (fraction) of each lossy option when the model has no kvtc
# calibration (whose stored costs, ``KVTCCalibration.costs()``, come first): the costs of
# SmolLM2-135M-Instruct's calibration by the one rule of ``kvtransfer.quality`` (an upper
# bound: the larger of the mean perplexity change and the KL on 8 calibration windows of
# 2048+64 tokens, plus a one-sided 95% interval of what a 512-token evaluation measures;
# monotone in the level), ``python -m kvtransfer.codecs.kvtc MODEL_DIR --remeasure``,
# session 9 (benchmarks/results/2026-12-06-kv-quality). Measured means on those texts:
# int8 +0.01%, cachegen:0 +0.57% (KL 0.004), cachegen:1 +1.18% (KL 0.013): no cachegen
# level is within the default 1% floor by the rule. cachegen:4-5: never within any floor
# tried (+78% / +276% measured). A level whose cost was not measured is never within a
# quality floor (inf).
QUALITY_LOSS = {"none": 0.0, "lossless": 0.0, "int8": 0.0025,
                "cachegen:0": 0.0159, "cachegen:1": 0.0334, "cachegen:2": 0.0906, "cachegen:3": 0.2393,
                "cachegen:4": 0.782, "cachegen:5": 2.76}


def expected_quality_loss(name: str, level: int | None, measured: dict[str, float] | None = None) -> float:
    """The option's expected perplexity increase (fraction): ``measured`` (e.g. a kvtc
    calibration's stored per-level costs) first, then QUALITY_LOSS, else inf."""
    label = option_label(name, level)
    if measured and label in measured:
        return max(0.0, measured[label])
    return QUALITY_LOSS.get(label, float("inf"))


def strongest_within(name: str, max_quality_loss: float, measured: dict[str, float] | None = None) -> int:
    """The strongest level of codec name whose expected quality loss is within the floor
    (level 0 when none is: the least lossy there is)."""
    ok = [lv for lv in range(LEVELS[name]) if expected_quality_loss(name, lv, measured) <= max_quality_loss]
    return max(ok, default=0)


def within_floor(options: list[CodecOption], max_quality_loss: float) -> list[CodecOption]:
    """The options whose expected quality loss is within the floor (exact ones always)."""
    return [o for o in options if o.lossiness == 0 or o.quality_loss <= max_quality_loss]


def codec_for(label: str, layer: int, layers: int, first_token: int = 0) -> object:
    """The codec of an option label for one layer of a model of ``layers`` (as transfers
    code it): cachegen and kvtc know where the layer sits; kvtc also where the tokens sit
    (first_token: it codes keys before RoPE) and takes the calibration this process
    loaded for its model (``kvtc.register(..., current=True)``)."""
    from kvtransfer.codec import get_codec

    name, level = parse_label(label)
    opts: dict[str, object] = {}
    if name in LEVELS:
        opts = {"level": level if level is not None else 0, "first_layer": layer, "total_layers": layers}
    if name == "kvtc":
        from kvtransfer.codecs import kvtc

        opts["calibration"] = kvtc.current()
        opts["first_token"] = first_token
    return get_codec(name, **opts)


def profile_options(sample: "torch.Tensor", labels: list[str], repeat: int = 2,
                    piece_tokens: int | None = None, measured: dict[str, float] | None = None) -> list[CodecOption]:
    """Measure each option on a sample of the model's KV ([layers, 2, tokens, kvh, hd]),
    coded the way transfers code it (one piece per layer and chunk of ``piece_tokens``):
    size ratio, and encode and decode speed (raw bytes per second, best of ``repeat``)."""
    import time

    layers, t = sample.shape[0], sample.shape[2]
    c = piece_tokens or t
    pieces = [(layer, sample[layer:layer + 1, :, a:a + c]) for layer in range(layers) for a in range(0, t, c)]
    starts = [a for _ in range(layers) for a in range(0, t, c)]
    raw = sample.numel() * sample.element_size()
    out = []
    for label in labels:
        name, level = parse_label(label)
        codecs: list = [codec_for(label, layer, layers) for layer in range(layers)]
        enc_s = dec_s = float("inf")
        size = 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            data = [(codec_for(label, layer, layers, a) if name == "kvtc" else codecs[layer]).encode(p)
                    for (layer, p), a in zip(pieces, starts)]
            t1 = time.perf_counter()
            for (layer, _), d in zip(pieces, data):
                codecs[layer].decode(d)
            t2 = time.perf_counter()
            enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
            size = sum(map(len, data))
        out.append(CodecOption(name, level, size / raw, raw / max(enc_s, 1e-9), raw / max(dec_s, 1e-9),
                               rank(name, level), expected_quality_loss(name, level, measured)))
    return out
