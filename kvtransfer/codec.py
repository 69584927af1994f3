"""KV codecs: ``get_codec(name, **options)`` returns a ``KVCodec`` with
``encode(kv: Tensor) -> bytes`` and ``decode(data: bytes) -> Tensor``; ``kv`` is
``[layers, 2, tokens, kv_heads, head_dim]`` (2 = key, value) in fp32, fp16 or bf16.

Every stream is self-describing, so ``decode`` (and ``decode_any``) need no side
information::

    magic "SSKC" | version u8 (3) | codec id u8 | dtype u8 | reserved u8 | shape 5 x u32
    | options length u16 | options (codec-specific: level, bits, ...) | payload length u64
    | CRC32 u32 of everything before it and of the payload | payload

The CRC covers the header too, so a flipped bit anywhere (shape, options, payload) is a
``CodecError`` naming what was wrong, never a silently different tensor.

Codecs (one module each under ``kvtransfer/codecs/``):

- ``none``: the raw bytes, bit-exact.
- ``lossless``: bit-exact and smaller; each value's top byte (sign + exponent bits) is
  coded as an index into a window of its most frequent values with an escape list, the
  lower bytes are kept raw (SplitZip); vectorised, ~1-2 GB/s per core each way.
- ``int8``: symmetric int8, keys per channel, values per token (KIVI), fp16 scales.
- ``cachegen``: CacheGen (SIGCOMM 2024): anchor/delta tokens, layer-dependent
  quantisation, range coding with per-(layer, channel) tables; ``level`` 0..5.

Calibration. ``calibrate(name, samples)`` computes per-model side information once
(``lossless``: the head table; ``cachegen``: probability tables and a PCA basis), passed
back as ``get_codec("lossless", table=...)`` / ``get_codec("cachegen", tables=...)``.
A ``lossless`` stream still carries its table; a calibrated ``cachegen`` stream names
its tables' fingerprint and needs the same tables to decode.

Chunks. Tokens can be coded independently, with a level per chunk (CacheGen's per-chunk
adaptation): ``encode`` a token slice ``kv[:, :, a:b]`` with the codec of that chunk's
level and concatenate the decoded slices on dim 2. ``encode_chunks`` / ``decode_chunks``
do exactly that and frame the pieces in one buffer.
"""

from __future__ import annotations

import importlib
import struct
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

MAGIC = b"SSKC"
VERSION = 3
# magic, version, codec id, dtype id, reserved, shape x5, options length
_HEAD = struct.Struct("<4sBBBB5IH")
_TAIL = struct.Struct("<QI")  # payload length, CRC32
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES_BY_ID = {v: k for k, v in DTYPE_IDS.items()}
# module, class name, codec id
# Bytes-like buffers (numpy arrays included), joined once into the stream.
Payload = Any
_REGISTRY: dict[str, tuple[str, str, int]] = {
    "none": ("kvtransfer.codecs.none", "NoneCodec", 0),
    "lossless": ("kvtransfer.codecs.lossless", "LosslessCodec", 1),
    "int8": ("kvtransfer.codecs.int8", "Int8Codec", 2),
    "cachegen": ("kvtransfer.codecs.cachegen", "CacheGenCodec", 3),
}


class CodecError(ValueError):
    """Bytes that are not a valid KV stream: wrong magic or version, unknown codec,
    truncated, failed checksum, or a payload that does not parse."""


class KVCodec:
    """Base class: the header, its checks and the shape/dtype checks live here;
    subclasses implement ``_encode`` (payload and options bytes) and ``_decode``."""

    name: ClassVar[str] = "base"
    codec_id: ClassVar[int] = 255
    # Option names get_codec accepts for this codec.
    options: ClassVar[tuple[str, ...]] = ()

    def encode(self, kv: torch.Tensor) -> bytes:
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
        if kv.dtype not in DTYPE_IDS:
            raise ValueError(f"kv dtype {kv.dtype} not supported; allowed: float32, float16, bfloat16")
        if any(s >= 2**32 for s in kv.shape):
            raise ValueError(f"kv shape {tuple(kv.shape)} does not fit the stream header (u32 per dim)")
        kv = kv.detach().cpu().contiguous()
        opts, parts = self._encode(kv)
        parts = [parts] if isinstance(parts, (bytes, bytearray, memoryview, np.ndarray)) else parts
        length = sum(memoryview(p).nbytes for p in parts)
        head = _HEAD.pack(MAGIC, VERSION, self.codec_id, DTYPE_IDS[kv.dtype], 0, *kv.shape, len(opts)) + opts
        crc = zlib.crc32(head + struct.pack("<Q", length))
        for p in parts:
            crc = zlib.crc32(p, crc)
        return b"".join([head, _TAIL.pack(length, crc), *parts])

    def decode(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        cid, dtype, shape, opts, payload = parse(data)
        if cid != self.codec_id:
            raise CodecError(f"KV stream was written by codec id {cid} ({_name_of(cid)}), "
                             f"not {self.name} ({self.codec_id}); use decode_any")
        try:
            out = self._decode(payload, shape, dtype, opts)
        except CodecError:
            raise
        except Exception as e:  # a payload that passed its CRC but does not parse
            raise CodecError(f"{self.name} KV payload is malformed: {type(e).__name__}: {e}") from None
        if tuple(out.shape) != shape or out.dtype != dtype:
            raise CodecError(f"{self.name} KV payload decoded to {tuple(out.shape)} {out.dtype}, "
                             f"header says {shape} {dtype}")
        return out

    def _encode(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        """kv (contiguous, on CPU) -> (options bytes, payload: one buffer or a list of
        buffers, concatenated once by encode)."""
        raise NotImplementedError

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                opts: bytes) -> torch.Tensor:
        raise NotImplementedError


def parse(data: bytes | bytearray | memoryview) -> tuple[int, torch.dtype, tuple[int, ...], bytes, memoryview]:
    """Check a stream's header and checksum: (codec id, dtype, shape, options, payload)."""
    view = memoryview(data).cast("B")
    if len(view) < 4 or bytes(view[:4]) != MAGIC:
        raise CodecError(f"not a KV stream: magic {bytes(view[:4])!r}, expected {MAGIC!r}")
    if len(view) < _HEAD.size:
        raise CodecError(f"KV stream is {len(view)} bytes, shorter than its {_HEAD.size}-byte header")
    _, ver, cid, did, _, *rest = _HEAD.unpack_from(view)
    shape, n_opts = tuple(rest[:5]), rest[5]
    if ver != VERSION:
        raise CodecError(f"KV stream version {ver}; this build reads version {VERSION}")
    end_head = _HEAD.size + n_opts
    if len(view) < end_head + _TAIL.size:
        raise CodecError(f"KV stream truncated: {len(view)} bytes, its header alone needs {end_head + _TAIL.size}")
    length, crc = _TAIL.unpack_from(view, end_head)
    payload = view[end_head + _TAIL.size:]
    if len(payload) != length:
        raise CodecError(f"KV stream truncated: payload {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload, zlib.crc32(view[:end_head + 8])) != crc:
        raise CodecError("KV stream failed its CRC32 checksum (corrupted in header or payload)")
    if did not in DTYPES_BY_ID:
        raise CodecError(f"KV stream has unknown dtype id {did}")
    if shape[1] != 2:
        raise CodecError(f"KV stream shape {shape} is not [layers, 2, tokens, kv_heads, head_dim]")
    return cid, DTYPES_BY_ID[did], shape, bytes(view[_HEAD.size:end_head]), payload


def _name_of(cid: int) -> str:
    return next((n for n, (_, _, c) in _REGISTRY.items() if c == cid), "unknown")


def _codec_class(name: str) -> type[KVCodec]:
    mod, cls, _ = _REGISTRY[name]
    out: type[KVCodec] = getattr(importlib.import_module(mod), cls)
    return out


def get_codec(name: str, **options: Any) -> KVCodec:
    """The codec called name (none, lossless, int8, cachegen) with its options; unknown
    names or options raise ValueError naming what is allowed."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown codec {name!r}; allowed: {sorted(_REGISTRY)}")
    cls = _codec_class(name)
    bad = set(options) - set(cls.options)
    if bad:
        raise ValueError(f"codec {name!r} takes options {sorted(cls.options)}; got {sorted(bad)}")
    return cls(**options)


def calibrate(name: str, samples: list[torch.Tensor] | torch.Tensor, **kwargs: Any) -> Any:
    """Per-model side information, computed once from sample KV and passed back as an
    option: ``lossless`` -> a head table (``table=``), ``cachegen`` -> probability tables
    and PCA basis (``tables=``; kwargs: levels, group, transform). Other codecs have none."""
    if name == "lossless":
        from kvtransfer.codecs.lossless import calibrate as lossless_calibrate

        return lossless_calibrate(samples, **kwargs)
    if name == "cachegen":
        from kvtransfer.codecs.cachegen import calibrate as cachegen_calibrate

        return cachegen_calibrate(samples, **kwargs)
    raise ValueError(f"codec {name!r} has nothing to calibrate; calibrate works for: cachegen, lossless")


def decode_any(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode a stream written by any codec (its header names the codec)."""
    cid = parse(data)[0]
    for name, (_, _, c) in _REGISTRY.items():
        if c == cid:
            return _codec_class(name)().decode(data)
    raise CodecError(f"KV stream names unknown codec id {cid}; known: "
                     f"{ {n: c for n, (_, _, c) in _REGISTRY.items()} }")


_FRAME = struct.Struct("<4sI")  # magic, number of chunks; then u64 length per chunk
_FRAME_MAGIC = b"SSKF"


def encode_chunks(kv: torch.Tensor, chunk_tokens: int,
                  codecs: KVCodec | Sequence[KVCodec]) -> bytes:
    """Code token chunks of kv independently: chunk i (tokens [i*chunk_tokens, ...)) with
    codecs[i] (or one codec for all), so a controller can pick a level per chunk. The
    result frames the chunk streams; ``decode_chunks`` reverses it. A caller that sends
    chunks separately can call ``codec.encode(kv[:, :, a:b])`` itself instead."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    starts = list(range(0, kv.shape[2], chunk_tokens)) or [0]
    per = [codecs] * len(starts) if isinstance(codecs, KVCodec) else list(codecs)
    if len(per) != len(starts):
        raise ValueError(f"{len(starts)} chunks of {chunk_tokens} tokens but {len(per)} codecs")
    parts = [c.encode(kv[:, :, s:s + chunk_tokens]) for c, s in zip(per, starts)]
    return b"".join([_FRAME.pack(_FRAME_MAGIC, len(parts)), struct.pack(f"<{len(parts)}Q", *map(len, parts)),
                     *parts])


def split_chunks(data: bytes | bytearray | memoryview) -> list[memoryview]:
    """The chunk streams of an ``encode_chunks`` buffer."""
    view = memoryview(data).cast("B")
    if len(view) < _FRAME.size or bytes(view[:4]) != _FRAME_MAGIC:
        raise CodecError(f"not a chunked KV buffer: magic {bytes(view[:4])!r}, expected {_FRAME_MAGIC!r}")
    (_, n) = _FRAME.unpack_from(view)
    pos = _FRAME.size + 8 * n
    if len(view) < pos:
        raise CodecError(f"chunked KV buffer truncated: {len(view)} bytes, its index needs {pos}")
    lengths = np.frombuffer(view[_FRAME.size:pos], dtype="<u8")
    want = pos + int(lengths.sum())
    if want != len(view):
        what = "truncated" if want > len(view) else "has trailing bytes"
        raise CodecError(f"chunked KV buffer {what}: {len(view)} bytes, its index says {want}")
    out = []
    for ln in lengths.tolist():
        out.append(view[pos:pos + ln])
        pos += ln
    return out


def decode_chunks(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode an ``encode_chunks`` buffer (each chunk by the codec its header names)."""
    parts = [decode_any(p) for p in split_chunks(data)]
    return torch.cat(parts, dim=2)
