"""``lossless``: bit-exact and smaller (SplitZip, 2026: KV exponents are very skewed).

Table mode (default, ``entropy="table"``; vectorised numpy, about 2 GB/s of raw KV per
core each way for bf16 and fp16): every value's top byte (sign and the exponent's top
bits) becomes a *symbol*, rotated left by one bit (``2 * rest + sign``: the frequent top
bytes of a KV tensor are the magnitudes around its typical one, of both signs, so this
puts them side by side); the other bytes are kept raw:

- bf16: symbol = sign + 7 exponent MSBs; raw = the low byte (exponent LSB + 7 mantissa
  bits);
- fp16: symbol = sign + 5 exponent bits + 2 mantissa MSBs; raw = the low byte;
- fp32: symbol = sign + 7 exponent MSBs; raw = the low 16 bits and the third byte.

A symbol is coded as a ``bits``-wide index into a window of ``2**bits - 1`` consecutive
symbols; the last index is an escape whose top byte goes, raw, into an escape list. The
window is arithmetic (subtract its start), never a gather, and every pass is a numpy
ufunc over 8/16-bit lanes. ``bits`` and the window are chosen per tensor to minimise the
size over the fast widths 2, 4 and 6 (byte-aligned packings; 3, 5 and 7 as bit planes
through the ``bits`` option) from a subsample, or taken from a calibrated table; both
(2 bytes) are always in the stream. Typical choice: bf16 4 bits (12 bits a value), fp16
6 bits (14 bits a value).

``"range"``: arithmetic coding (rANS, ``rangecoding``) of the sign+exponent head with
its histogram, shipped in the stream (~30-60 bytes): closer to the entropy (bf16 1.50x
instead of 1.33x on the trained model's KV), about 5-10x slower. Heads there are bf16 /
fp32: the top byte; fp16: sign + 5 exponent bits (the 2 mantissa MSBs in a packed 2-bit
stream).

``calibrate(samples)`` computes the table once per model (it then skips the histogram
on the hot path); without it the table comes from a subsample of the tensor itself. A
table's window is in the rotated-symbol space above (for fp16 that space is the whole
top byte since stream version 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kvtransfer.codecs.base import KVCodec, Payload
from kvtransfer.codecs import bitpack, rangecoding
from kvtransfer.codecs.none import bits_of, tensor_from_bits

HEAD_BITS = {torch.bfloat16: 8, torch.float32: 8, torch.float16: 6}
_OPTS = struct.Struct("<BB")  # entropy mode (0 table, 1 range), index bits
_SAMPLE = 1 << 14  # values (a strided sample) histogrammed to choose the table
# Index widths chosen by default: byte-aligned packings (bitpack) keep the codec near 2 GB/s
# per core; 3, 5 and 7 bits (bit planes) can be a few % smaller but are about 2x slower.
FAST_BITS = (2, 4, 6)


@dataclass(frozen=True)
class LosslessTable:
    """Calibrated table for one dtype: a window of symbols (see the module docstring)."""

    # torch dtype name: "bfloat16", "float16" or "float32".
    dtype: str
    # Index width in bits (2..7); the window holds 2**bits - 1 symbols.
    bits: int
    # First symbol (top byte rotated left by one bit: 2 * rest + sign) of the window.
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


def symbols(u: np.ndarray) -> np.ndarray:
    """Table-mode symbols of raw bit patterns (uint16 or uint32): the top byte rotated left
    by one bit (sign to bit 0), in a fresh array of u's dtype."""
    top = 8 * u.itemsize
    f = np.right_shift(u, top - 9)
    np.bitwise_and(f, f.dtype.type(0xFE), out=f)
    sign = np.right_shift(u, top - 1)
    np.bitwise_or(f, sign, out=f)
    return f


def sparse_nonzero(mask: np.ndarray) -> np.ndarray:
    """np.flatnonzero of a bool array that is mostly False (escapes), faster: find the
    non-zero 8-byte words first, then the positions within those words only."""
    k = len(mask) // 8 * 8
    words = mask[:k].view(np.uint64)
    hit = np.flatnonzero(words != 0)
    if len(hit) > len(words) // 16:  # dense: the plain scan is as fast
        return np.flatnonzero(mask)
    within = np.flatnonzero(words[hit].view(np.bool_))
    out: np.ndarray = hit[within >> 3] * 8 + (within & 7)
    if k < len(mask):
        out = np.concatenate([out, np.flatnonzero(mask[k:]) + k])
    return out


def choose_table(counts: np.ndarray, widths: tuple[int, ...] = FAST_BITS) -> tuple[int, int]:
    """(bits, window start) minimising index bits + 8 bits per escape for these counts of
    symbols, over the allowed index widths."""
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
    ``get_codec("lossless", table=...)``. bits: index width (2..7), default the best of
    the fast widths (2, 4, 6)."""
    items = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    if not items or any(t.dtype != items[0].dtype for t in items) or items[0].dtype not in HEAD_BITS:
        raise ValueError("calibrate needs one or more KV tensors of one dtype (float32, float16 or bfloat16)")
    counts = sum(np.bincount(symbols(bits_of(t.detach().cpu().contiguous())), minlength=256) for t in items)
    bits, start = choose_table(np.asarray(counts), FAST_BITS if bits is None else (_check_bits(bits),))
    return LosslessTable(str(items[0].dtype).removeprefix("torch."), bits, start)


def _check_bits(bits: int) -> int:
    if bits not in range(2, 8):
        raise ValueError(f"lossless bits must be 2..7, got {bits!r}")
    return bits


class LosslessCodec(KVCodec):
    name, codec_id = "lossless", 1
    options: ClassVar[tuple[str, ...]] = ("entropy", "table", "bits")

    def __init__(self, entropy: str = "table", table: LosslessTable | None = None, bits: int | None = None) -> None:
        """entropy: "table" (fast) or "range"; table: from calibrate (else chosen per
        tensor); bits: force the index width (2..7) instead of the best of 2, 4 and 6."""
        if entropy not in ("table", "range"):
            raise ValueError(f"lossless entropy must be 'table' or 'range', got {entropy!r}")
        self.entropy = entropy
        self.table = table
        self.widths = FAST_BITS if bits is None else (_check_bits(bits),)

    def _encode(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        if self.entropy == "range":
            return self._encode_range(kv)
        u = bits_of(kv)
        sym = symbols(u)
        if self.table is not None and self.table.dtype == str(kv.dtype).removeprefix("torch."):
            bits, start = self.table.bits, self.table.start
        else:
            step = max(1, len(sym) // _SAMPLE)
            bits, start = choose_table(np.bincount(sym[::step], minlength=256), self.widths)
        esc = (1 << bits) - 1
        idx = sym
        np.subtract(idx, idx.dtype.type(start), out=idx)  # wraps below the window: escapes either way
        where = sparse_nonzero(np.greater_equal(idx, esc))
        escapes = (u[where] >> (8 * u.itemsize - 8)).astype(np.uint8)
        idx[where] = esc
        packed = bitpack.pack(idx.astype(np.uint8), bits)
        raw = [u.astype(np.uint8)] if u.itemsize == 2 else [u.astype(np.uint16), (u >> 16).astype(np.uint8)]
        return _OPTS.pack(0, bits), [struct.pack("<BQ", start, len(escapes)), *raw, packed, escapes]

    def _encode_range(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        head, raw = split(kv)
        width = HEAD_BITS[kv.dtype]
        counts = np.bincount(head, minlength=1 << width)
        syms = np.flatnonzero(counts).astype(np.uint8)
        table = rangecoding.normalize(counts[syms])
        lut = np.zeros(1 << width, np.int32)
        lut[syms] = np.arange(len(syms), dtype=np.int32)
        words = rangecoding.encode([lut[head]], [0], [table])
        return _OPTS.pack(1, 0), [struct.pack("<H", len(syms)), syms, table, *raw, words]

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

        def done() -> None:
            if pos != len(buf):
                raise ValueError(f"{len(buf) - pos} bytes left over after the last field")

        if mode == 1:
            (k,) = struct.unpack("<H", take(2).tobytes())
            syms = take(k)
            table = take(2 * k).view(np.uint16)
            raw = [take(s) for s in raw_sizes(dtype, n)]
            words = take(len(buf) - pos)
            if len(words) % 4:
                raise ValueError("range-coded heads are not whole 32-bit words")
            head = syms[rangecoding.decode(words.view(np.uint32), [n], [0], [table])[0]]
            done()
            return join(head, raw, dtype, shape)
        if mode != 0 or not 2 <= bits <= 7:
            raise ValueError(f"unknown lossless mode {mode} / index bits {bits}")
        esc = (1 << bits) - 1
        start, n_esc = struct.unpack("<BQ", take(9).tobytes())
        if start + esc > 256:
            raise ValueError(f"table window {start}+{esc} exceeds 8-bit symbols")
        wide = dtype == torch.float32
        low = take(2 * n if wide else n)
        mid = take(n) if wide else None
        idx = bitpack.unpack(take(bitpack.packed_size(n, bits)), bits, n)
        escapes = take(n_esc)
        done()
        where = sparse_nonzero(np.equal(idx, np.uint8(esc)))
        if len(where) != n_esc:
            raise ValueError(f"{len(where)} escape indices but {n_esc} escaped top bytes")
        # symbol f = index + start -> top byte (f rotated right by one bit), placed in the
        # value's top byte: ((f << 7) & 0x7F00 | f << 15) >> (16 - width) ... done in the
        # value's own width, then the raw bytes below it.
        if wide:
            assert mid is not None
            f32 = idx.astype(np.uint32)
            f32 += np.uint32(start)
            u32 = np.left_shift(f32, 23)
            u32 &= np.uint32(0x7F000000)
            np.left_shift(f32, 31, out=f32)
            u32 |= f32
            u32[where] = escapes.astype(np.uint32) << 24
            u32 |= np.left_shift(mid, 16, dtype=np.uint32)
            u32 |= low.view(np.uint16)
            return tensor_from_bits(u32, dtype, shape)
        f = idx.astype(np.uint16)
        f += np.uint16(start)
        u = np.left_shift(f, 7)
        u &= np.uint16(0x7F00)
        np.left_shift(f, 15, out=f)
        u |= f
        u[where] = escapes.astype(np.uint16) << 8
        np.copyto(f, low)
        u |= f
        return tensor_from_bits(u, dtype, shape)
