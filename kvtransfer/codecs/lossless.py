"""``lossless``: bit-exact and smaller (SplitZip, 2026: KV exponents are very skewed).

Each value is split into a *head* symbol (sign and exponent bits) and raw mantissa bytes:

- bf16: head = the high byte (sign + 7 exponent MSBs); raw = the low byte (exponent LSB
  + 7 mantissa bits);
- fp32: head = the high byte, as for bf16; raw = the low 16 bits and the third byte;
- fp16: head = sign + 5 exponent bits (6 bits); raw = the low byte and the 2 mantissa
  MSBs (a packed 2-bit stream).

Heads are coded in one of two ways (option ``entropy``):

- ``"table"`` (default, vectorised numpy): a ``bits``-wide index into a table of
  ``2**bits - 1`` heads; the last index is an escape whose head goes, raw, into an escape
  list. The table is a window of consecutive heads in sign-folded order
  (``2 * exponent + sign``: the frequent heads of a KV tensor are the exponents around its
  typical magnitude, of both signs), so that mapping is arithmetic, not a gather, which
  keeps the codec near 1 GB/s per core. ``bits`` (2..5) and the window are chosen per
  tensor to minimise the size (or taken from a calibrated table); both (2 bytes) are
  always in the stream.
- ``"range"``: arithmetic coding (constriction's ANS coder) with the heads' histogram,
  shipped in the stream (~30-60 bytes): closer to the entropy (bf16 1.50x instead of
  1.33x on the trained model's KV), about 5-10x slower.

``calibrate(samples)`` computes the table once per model (it then skips the histogram
on the hot path); without it the table comes from a subsample of the tensor itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kvtransfer.codec import KVCodec, Payload
from kvtransfer.codecs import bitpack, rangecoding
from kvtransfer.codecs.none import UINT, bits_of, tensor_from_bits

HEAD_BITS = {torch.bfloat16: 8, torch.float32: 8, torch.float16: 6}
_OPTS = struct.Struct("<BB")  # entropy mode (0 table, 1 range), index bits
_SAMPLE = 1 << 16  # values histogrammed to choose the table
# Index widths chosen by default: byte-aligned packing keeps the codec near 1 GB/s per core;
# 3 and 5 bits (bit planes) can be ~5% smaller but run at about half that speed.
FAST_BITS = (2, 4)


@dataclass(frozen=True)
class LosslessTable:
    """Calibrated head table for one dtype: a window of sign-folded heads."""

    # torch dtype name: "bfloat16", "float16" or "float32".
    dtype: str
    # Index width in bits (2..5); the window holds 2**bits - 1 folded heads.
    bits: int
    # First folded head (2 * exponent field + sign) of the window.
    start: int


def split(kv: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """(head symbols uint8, raw parts) of a contiguous CPU tensor."""
    u = bits_of(kv)
    if kv.dtype == torch.float32:
        return (u >> 24).astype(np.uint8), [u.astype(np.uint16), (u >> 16).astype(np.uint8)]
    low = u.astype(np.uint8)
    hi = (u >> 8).astype(np.uint8)
    if kv.dtype == torch.bfloat16:
        return hi, [low]
    m2 = hi & np.uint8(3)
    hi >>= 2
    return hi, [low, bitpack.pack(m2, 2)]


def join(head: np.ndarray, raw: list[np.ndarray], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = len(head)
    if dtype == torch.float32:
        u32 = np.left_shift(head, 24, dtype=np.uint32)
        u32 |= np.left_shift(raw[1], 16, dtype=np.uint32)
        u32 |= raw[0].view(np.uint16)
        return tensor_from_bits(u32, dtype, shape)
    if dtype == torch.float16:
        head <<= 2
        head |= bitpack.unpack(raw[1], 2, n)
    u = np.left_shift(head, 8, dtype=np.uint16)
    u |= raw[0]
    return tensor_from_bits(u, dtype, shape)


def raw_sizes(dtype: torch.dtype, n: int) -> list[int]:
    if dtype == torch.bfloat16:
        return [n]
    if dtype == torch.float32:
        return [2 * n, n]
    return [n, bitpack.packed_size(n, 2)]


def fold(head: np.ndarray, width: int) -> np.ndarray:
    """Head (sign at the top bit) -> 2 * rest + sign, so both signs of one magnitude sit
    side by side."""
    k = head << 1
    k |= head >> (width - 1)
    if width < 8:
        k &= np.uint8((1 << width) - 1)
    return k


def unfold(k: np.ndarray, width: int) -> np.ndarray:
    h = k >> 1
    h |= (k & np.uint8(1)) << (width - 1)
    return h


def choose_table(counts: np.ndarray, widths: tuple[int, ...] = FAST_BITS) -> tuple[int, int]:
    """(bits, window start) minimising index bits + 8 bits per escape for these counts of
    folded heads, over the allowed index widths."""
    total = max(int(counts.sum()), 1)
    cum = np.concatenate([[0], np.cumsum(counts)])
    best: tuple[float, int, int] = (float("inf"), 4, 0)
    for bits in widths:
        w = (1 << bits) - 1
        covered = cum[w:] - cum[:-w]
        start = int(np.argmax(covered))
        cost = bits + 8 * (total - int(covered[start])) / total
        best = min(best, (cost, bits, start))
    return best[1], best[2]


def calibrate(samples: list[torch.Tensor] | torch.Tensor, bits: int | None = None) -> LosslessTable:
    """A head table from sample KV of one model (all one dtype); pass it as
    ``get_codec("lossless", table=...)``. bits: index width (2..5), default the best of
    the fast widths (2, 4)."""
    items = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    if not items or any(t.dtype != items[0].dtype for t in items) or items[0].dtype not in HEAD_BITS:
        raise ValueError("calibrate needs one or more KV tensors of one dtype (float32, float16 or bfloat16)")
    width = HEAD_BITS[items[0].dtype]
    counts = sum(np.bincount(fold(split(t.detach().cpu().contiguous())[0], width), minlength=1 << width)
                 for t in items)
    bits, start = choose_table(np.asarray(counts), FAST_BITS if bits is None else (_check_bits(bits),))
    return LosslessTable(str(items[0].dtype).removeprefix("torch."), bits, start)


def _check_bits(bits: int) -> int:
    if bits not in (2, 3, 4, 5):
        raise ValueError(f"lossless bits must be 2, 3, 4 or 5, got {bits!r}")
    return bits


class LosslessCodec(KVCodec):
    name, codec_id = "lossless", 1
    options: ClassVar[tuple[str, ...]] = ("entropy", "table", "bits")

    def __init__(self, entropy: str = "table", table: LosslessTable | None = None, bits: int | None = None) -> None:
        """entropy: "table" (fast) or "range"; table: from calibrate (else chosen per
        tensor); bits: force the index width (2..5) instead of the best of 2 and 4."""
        if entropy not in ("table", "range"):
            raise ValueError(f"lossless entropy must be 'table' or 'range', got {entropy!r}")
        self.entropy = entropy
        self.table = table
        self.widths = FAST_BITS if bits is None else (_check_bits(bits),)

    def _encode(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        head, raw = split(kv)
        width = HEAD_BITS[kv.dtype]
        if self.entropy == "range":
            counts = np.bincount(head, minlength=1 << width)
            syms = np.flatnonzero(counts).astype(np.uint8)
            table = rangecoding.normalize(counts[syms])
            lut = np.zeros(1 << width, np.int32)
            lut[syms] = np.arange(len(syms), dtype=np.int32)
            words = rangecoding.encode([lut[head]], [0], [table])
            return _OPTS.pack(1, 0), [struct.pack("<H", len(syms)), syms, table, *raw, words]
        if self.table is not None and self.table.dtype == str(kv.dtype).removeprefix("torch."):
            bits, start = self.table.bits, self.table.start
        else:
            step = max(1, len(head) // _SAMPLE)
            bits, start = choose_table(np.bincount(fold(head[::step], width), minlength=1 << width), self.widths)
        esc = (1 << bits) - 1
        idx = fold(head, width)
        idx -= np.uint8(start)  # wraps below the window: escapes either way
        np.minimum(idx, np.uint8(esc), out=idx)
        escapes = head[np.flatnonzero(idx == esc)]
        return _OPTS.pack(0, bits), [struct.pack("<BQ", start, len(escapes)), *raw, bitpack.pack(idx, bits), escapes]

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                opts: bytes) -> torch.Tensor:
        mode, bits = _OPTS.unpack(opts)
        n = int(np.prod(shape))
        buf = np.frombuffer(payload, np.uint8)
        pos = 0

        def take(size: int) -> np.ndarray:
            nonlocal pos
            if pos + size > len(buf):
                raise ValueError(f"payload ends at byte {len(buf)}, a field needs bytes {pos}..{pos + size}")
            out = buf[pos:pos + size]
            pos += size
            return out

        if mode == 1:
            (k,) = struct.unpack("<H", take(2).tobytes())
            syms = take(k)
            table = take(2 * k).view(np.uint16)
            raw = [take(s) for s in raw_sizes(dtype, n)]
            words = take(len(buf) - pos)
            if len(words) % 4:
                raise ValueError("range-coded heads are not whole 32-bit words")
            head = syms[rangecoding.decode(words.view(np.uint32), [n], [0], [table])[0]]
        elif mode == 0 and 2 <= bits <= 5:
            esc = (1 << bits) - 1
            start, n_esc = struct.unpack("<BQ", take(9).tobytes())
            width = HEAD_BITS[dtype]
            if start + esc > 1 << width:
                raise ValueError(f"table window {start}+{esc} exceeds {width}-bit heads")
            raw = [take(s) for s in raw_sizes(dtype, n)]
            idx = bitpack.unpack(take(bitpack.packed_size(n, bits)), bits, n)
            escapes = take(n_esc)
            where = np.flatnonzero(idx == esc)
            if len(where) != n_esc:
                raise ValueError(f"{len(where)} escape indices but {n_esc} escaped heads")
            idx += np.uint8(start)
            head = unfold(idx, width)
            head[where] = escapes
        else:
            raise ValueError(f"unknown lossless mode {mode} / index bits {bits}")
        if pos != len(buf):
            raise ValueError(f"{len(buf) - pos} bytes left over after the last field")
        return join(head, raw, dtype, shape)
