"""``cachegen``: CacheGen (SIGCOMM 2024) KV encoding, ``get_codec("cachegen", level=...)``.

1. Token-wise locality: tokens in groups of ``group`` (10); each group's first token is
   its anchor; the others are coded as deltas against the reconstructed anchor (per
   channel, only where that is smaller than coding the value itself: see
   ``cachegen_quant``).
2. Layer-wise sensitivity: one uniform step per (layer, K/V), a fraction of that layer's
   RMS; the fraction (``LEVEL_STEPS[level]``) is scaled from ``SHALLOW`` (first layer)
   to ``DEEP`` (last layer), i.e. shallow layers get more bins.
3. Arithmetic coding (rANS, ``rangecoding``) with per-(layer, channel) probability
   tables: every (layer, channel) row picks one of 24 tables by its spread (the choice is
   shipped, 5 bits a row). The tables' counts are either computed from the chunk and
   shipped in the stream (default: the stream is self-describing) or calibrated once per
   model (``calibrate`` -> ``tables=``), which drops the table bytes from every chunk;
   ``describe(data)`` shows the share.
4. Levels 0..5 trade size for error; the error bound per value is step / 2.
5. Optionally (calibrated tables with a PCA basis, the strongest levels) KVTC's
   decorrelating transform; ``exact_head`` / ``exact_tail`` tokens (attention sink,
   most recent tokens) are kept exact.

Stream layout: ``cachegen_format``; the entropy stage (buckets, tables, escapes, low bits,
words): ``cachegen_symbols``.

Speed: the entropy coder is rANS with a lookup-table decoder (``rangecoding``, numba);
symbols are coded in pairs (half the coder steps) and wide buckets keep low bits raw; the
rest of decoding is a pair lookup table, in-place row placement and one token-major
reconstruction pass.

Chunks: encode a token slice per chunk with the level chosen for it; set ``exact_head``
only on the chunk holding the first tokens. RoPE is already applied to cached keys; the
PCA basis is computed on them as they are (KVTC undoes RoPE first; a token slice does
not carry its positions, so this codec does not).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from kvtransfer.codecs import cachegen_quant as cq
from kvtransfer.codecs import cachegen_symbols, rangecoding
from kvtransfer.codecs.base import CodecError, KVCodec, Payload, parse
from kvtransfer.codecs.cachegen_format import CALIBRATED, OPTS, PCA, RANS, sections, unsections
from kvtransfer.codecs.cachegen_tables import (ROLES, CacheGenTables, LevelTables, merge_counts, pca_basis,
                                               raw_counts)
from kvtransfer.codecs.none import UINT, bits_of, tensor_from_bits

# Step as a fraction of the layer's RMS, by level (0 finest .. 5 coarsest).
# Relative L2 error is about step / sqrt(12) (0.03 at level 0, 0.23 at level 3). The
# default, level 1, cost +1.2% perplexity (KL 0.013) on SmolLM2-135M's calibration texts
# and -0.8..+0.4% on held-out windows (4.2x vs fp16; level 0 +0.6%, 3.3x; level 3 +10-22%:
# benchmarks/results/2026-12-06-kv-quality); the adaptive controller and a pinned codec
# without a level go by the stored costs (``kvtransfer.adaptive.QUALITY_LOSS``), not by
# this default.
LEVEL_STEPS = (0.1, 0.2, 0.4, 0.8, 1.2, 1.6)
DEFAULT_LEVEL = 1
# Step multiplier of the first and of the last layer (linear in between).
SHALLOW, DEEP = 0.75, 1.25
# Step multiplier of keys and of values.
KV_STEP = (1.0, 1.0)


def layer_steps(level: int, layers: int, first_layer: int = 0, total_layers: int | None = None) -> np.ndarray:
    """Step as a fraction of the layer's RMS, [layers, 2] (keys, values), for layers
    first_layer.. of a model of total_layers (default: these layers are the model)."""
    total = layers + first_layer if total_layers is None else total_layers
    ramp = np.linspace(SHALLOW, DEEP, total) if total > 1 else np.ones(1)
    ramp = ramp[first_layer:first_layer + layers]
    return (LEVEL_STEPS[level] * ramp[:, None] * np.array(KV_STEP)[None]).astype(np.float32)


def steps_for(z: torch.Tensor, level: int, first_layer: int = 0, total_layers: int | None = None) -> np.ndarray:
    """The quantiser step delta [L, 2] of coded channels z [L, 2, T, C] (one pass: a norm)."""
    L = z.shape[0]
    n = z.shape[2] * z.shape[3]
    rms = (torch.linalg.vector_norm(z, dim=(2, 3)) / n ** 0.5).numpy() if n else np.zeros((L, 2), np.float32)
    if not np.isfinite(rms).all():  # NaN/inf, or squares past fp32 range: look again in fp64
        rms = z.double().pow(2).mean(dim=(2, 3)).sqrt().numpy()
        if not np.isfinite(rms).all():
            raise ValueError("cachegen codes finite KV only; this tensor holds NaN or inf (use 'lossless')")
    delta = (layer_steps(level, L, first_layer, total_layers) * np.where(rms > 0, rms, 1.0)).astype(np.float32)
    out: np.ndarray = np.maximum(delta, np.float32(1e-30))
    return out


class CacheGenCodec(KVCodec):
    name, codec_id = "cachegen", 3
    options: ClassVar[tuple[str, ...]] = ("level", "group", "tables", "exact_head", "exact_tail", "first_layer",
                                          "total_layers")

    def __init__(self, level: int = DEFAULT_LEVEL, group: int = 10, tables: CacheGenTables | None = None,
                 exact_head: int = 0, exact_tail: int = 0, first_layer: int = 0,
                 total_layers: int | None = None) -> None:
        """level 0..5; group: tokens per anchor group; tables: from calibrate; exact_head /
        exact_tail: tokens kept exact at either end (attention sink, recent tokens);
        first_layer / total_layers: when encoding a slice of layers (layer-wise transfer),
        where it sits in the model, so that the layer-dependent steps stay right."""
        if level not in range(len(LEVEL_STEPS)):
            raise ValueError(f"cachegen level must be 0..{len(LEVEL_STEPS) - 1}, got {level!r}")
        if not 1 <= group <= 255:
            raise ValueError(f"cachegen group must be 1..255 tokens, got {group!r}")
        if not (0 <= exact_head < 65536 and 0 <= exact_tail < 65536):
            raise ValueError("cachegen exact_head and exact_tail must be 0..65535 tokens")
        if not 0 <= first_layer < 65536 or (total_layers is not None and total_layers <= first_layer):
            raise ValueError(f"cachegen first_layer {first_layer} must be 0..65535 and below "
                             f"total_layers {total_layers}")
        self.first_layer, self.total_layers = first_layer, total_layers
        if tables is not None:
            if level not in tables.levels:
                raise ValueError(f"cachegen tables hold levels {sorted(tables.levels)}, not {level}")
            group = tables.group
        self.level, self.group, self.tables = level, group, tables
        self.exact_head, self.exact_tail = exact_head, exact_tail

    # -- transform ---------------------------------------------------------------------
    def _pca(self) -> bool:
        return self.tables is not None and self.tables.levels[self.level].pca

    @staticmethod
    def _to_channels(x: torch.Tensor, pca: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """[L, 2, T, H, D] -> the coded channels, token-major float32 [L, 2, T, H*D] (PCA
        coordinates with pca)."""
        if pca is not None:
            x = torch.einsum("lkthd,lkhde->lkthe", x.float() - pca[0][:, :, None], pca[1])
        L, _, T, H, D = x.shape
        out = torch.empty(L, 2, T, H, D, dtype=torch.float32)
        out.copy_(x)  # cast in one pass
        return out.view(L, 2, T, H * D)

    @staticmethod
    def _from_channels(z: torch.Tensor, shape: tuple[int, ...],
                       pca: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        L, _, T, H, D = shape
        x = z.reshape(L, 2, H, D, T).permute(0, 1, 4, 2, 3)
        if pca is not None:
            x = torch.einsum("lkthe,lkhde->lkthd", x, pca[1]) + pca[0][:, :, None]
        return x

    # -- encode ------------------------------------------------------------------------
    def quantize(self, kv: torch.Tensor) -> tuple[cq.Quantized, int, int]:
        """The middle tokens of kv quantised; (quantised, exact head, exact tail)."""
        L, _, T, H, D = kv.shape
        head = min(self.exact_head, T)
        tail = min(self.exact_tail, T - head)
        x = kv[:, :, head:T - tail]
        pca = None
        if self.tables is not None:
            self.tables.check_shape(tuple(kv.shape), self.first_layer)
            pca = self.tables.pca(self.first_layer, L) if self._pca() else None
        z = self._to_channels(x, pca)
        return cq.quantize(z, steps_for(z, self.level, self.first_layer, self.total_layers), self.group), head, tail

    def _rows(self, q: cq.Quantized) -> list[np.ndarray]:
        L, _, C = q.ref.shape
        return [q.qa.reshape(L * 2 * C, -1), q.qd.reshape(L * 2 * C, -1), q.ref.reshape(L * 2, C)]

    def _encode(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        q, head, tail = self.quantize(kv)
        T = kv.shape[2]
        exact = [bits_of(kv[:, :, :head].contiguous()), bits_of(kv[:, :, T - tail:].contiguous())]
        level = self.tables.levels[self.level] if self.tables is not None else None
        coded = cachegen_symbols.encode(self._rows(q), [q.sum_a, q.sum_d, None], level)
        flags = (CALIBRATED if level is not None else 0) | (PCA if self._pca() else 0) | RANS
        parts: list[Payload] = [b"".join(e.tobytes() for e in exact), q.delta, np.packbits(q.mode.reshape(-1)),
                                *coded]
        return OPTS.pack(self.level, self.group, flags, head, tail, self._stream_fingerprint(),
                         self.first_layer), sections(parts)

    # -- hooks of subclasses (kvtc: another transform, its own side information) ---------
    def _levels(self) -> int:
        return len(LEVEL_STEPS)

    def _stream_fingerprint(self) -> int:
        return self.tables.fingerprint if self.tables is not None else 0

    def _inverse(self, mid: torch.Tensor, shape: tuple[int, ...], tables: CacheGenTables | None, flags: int,
                 first_layer: int) -> torch.Tensor:
        """Token-major coded channels [L, 2, T, C] -> KV [L, 2, T, H, D] (float32)."""
        L, _, Tm, H, D = shape
        out = mid.view(L, 2, Tm, H, D)
        pca = tables.pca(first_layer, L) if tables is not None and flags & PCA else None
        if flags & PCA and pca is None:
            raise ValueError("stream is in PCA coordinates but the tables hold no PCA basis")
        if pca is not None:
            out = torch.einsum("lkthe,lkhde->lkthd", out, pca[1]) + pca[0][:, :, None]
        return out

    # -- decode ------------------------------------------------------------------------
    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                opts: bytes) -> torch.Tensor:
        level, group, flags, head, tail, fp, first_layer = OPTS.unpack(opts)
        L, _, T, H, D = shape
        C, Tm = H * D, T - head - tail
        if level >= self._levels() or group < 1 or Tm < 0:
            raise ValueError(f"bad cachegen options: level {level}, group {group}, exact {head}+{tail} of {T}")
        if not flags & RANS:
            raise CodecError(f"{self.name} stream was entropy-coded by an older build (constriction ANS); this "
                             "build codes and decodes rANS streams only")
        tables = None
        if flags & CALIBRATED:
            if self.tables is None or self.tables.fingerprint != fp:
                have = "no tables" if self.tables is None else f"tables {self.tables.fingerprint:#010x}"
                raise CodecError(f"cachegen stream was coded with calibrated tables {fp:#010x}; this codec has "
                                 f"{have} (pass tables= from the same calibrate/load)")
            tables = self.tables
            tables.check_shape(shape, first_layer)
        sec = unsections(payload)
        np_u = UINT[dtype][0]
        item = np.dtype(np_u).itemsize
        exact = np.frombuffer(sec["exact"], np_u)
        if len(exact) * item != len(sec["exact"]) or len(exact) != L * 2 * (head + tail) * H * D:
            raise ValueError(f"exact tokens section is {len(sec['exact'])} bytes for {head}+{tail} tokens")
        delta = np.frombuffer(sec["delta"], np.float32).reshape(L, 2).copy()
        mode = np.unpackbits(np.frombuffer(sec["mode"], np.uint8), count=L * 2 * C).astype(bool).reshape(L, 2, C)
        anchors, others, _ = cq.token_layout(Tm, group)
        rows = cachegen_symbols.decode(sec, [L * 2 * C, L * 2 * C, L * 2], [len(anchors), len(others), C],
                                       tables.levels[level] if tables is not None else None)
        mid = cq.reconstruct_tokens(delta, rows[2].reshape(L, 2, C), mode, rows[0].reshape(L, 2, C, -1),
                                    rows[1].reshape(L, 2, C, -1), Tm, group)
        mid = self._inverse(mid, shape[:2] + (Tm,) + shape[3:], tables, flags, first_layer)
        if head == tail == 0:
            return mid.to(dtype)
        n_head = L * 2 * head * H * D
        out = torch.empty(shape, dtype=dtype)  # the exact tokens and the cast of the rest, one pass each
        out[:, :, :head] = tensor_from_bits(exact[:n_head], dtype, (L, 2, head, H, D))
        out[:, :, head:T - tail] = mid
        out[:, :, T - tail:] = tensor_from_bits(exact[n_head:], dtype, (L, 2, tail, H, D))
        return out


def describe(data: bytes | memoryview) -> dict[str, int]:
    """Bytes per section of a cachegen stream (side information vs coded symbols)."""
    _, _, _, opts, payload = parse(data)
    out = {k: len(v) for k, v in unsections(payload).items()}
    out["header"] = len(memoryview(data)) - len(payload)
    return out


def calibrate(samples: list[torch.Tensor] | torch.Tensor, levels: tuple[int, ...] = tuple(range(len(LEVEL_STEPS))),
              group: int = 10, transform: str = "auto") -> CacheGenTables:
    """Tables (and a PCA basis) from sample KV of one model, computed once per model.
    transform: "none", "pca" (every level), or "auto" (PCA at the levels where it makes
    the samples' streams at least 3% smaller)."""
    items = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    if not items:
        raise ValueError("calibrate needs at least one KV sample")
    if transform not in ("none", "pca", "auto"):
        raise ValueError(f"transform must be none, pca or auto, got {transform!r}")
    L, _, _, H, D = items[0].shape
    out = CacheGenTables(L, H, D, group)
    if transform != "none":
        out.pca_mean, out.pca_basis = pca_basis(items)
    for level in levels:
        choices = [False, True] if transform == "auto" else [transform == "pca"]
        best: tuple[int, LevelTables] | None = None
        for pca in choices:
            lt = _level_tables(items, level, group, pca, out)
            size = sum(len(get_codec_tables(out, level, lt).encode(s)) for s in items)
            if best is None or size < best[0] * (0.97 if pca else 1.0):
                best = (size, lt)
        assert best is not None
        out.levels[level] = best[1]
    return out


def get_codec_tables(tables: CacheGenTables, level: int, lt: LevelTables) -> CacheGenCodec:
    """A codec using lt as the tables of level (for calibration trials)."""
    trial = CacheGenTables(tables.layers, tables.kv_heads, tables.head_dim, tables.group, {level: lt},
                           tables.pca_mean, tables.pca_basis)
    return CacheGenCodec(level=level, tables=trial)


def _level_tables(items: list[torch.Tensor], level: int, group: int, pca: bool,
                  tables: CacheGenTables) -> LevelTables:
    probe = CacheGenCodec(level=level, group=group)
    rows_all: list[list[np.ndarray]] = [[], [], []]
    for kv in items:
        if pca:
            z = probe._to_channels(kv.float(), tables.pca(0, kv.shape[0]))
            q = cq.quantize(z, steps_for(z, level), group)
        else:
            q = probe.quantize(kv)[0]
        for role, r in enumerate(probe._rows(q)):
            rows_all[role].append(r)
    counts = []
    for role in range(len(ROLES)):
        acc: dict[int, np.ndarray] = {}
        for rows in rows_all[role]:
            merge_counts(acc, raw_counts(cq.to_streams(rows, cq.buckets_of(rows))))
        counts.append({k: rangecoding.normalize(v) for k, v in acc.items()})
    return LevelTables(counts, pca)
