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

Codecs (one module each under ``kvtransfer/codecs/``; the header, ``KVCodec`` and
``CodecError`` live in ``kvtransfer.codecs.base``, which they and this module import):

- ``none``: the raw bytes, bit-exact.
- ``lossless``: bit-exact and smaller; each value's top byte (sign + exponent bits) is
  coded as an index into a window of its most frequent values with an escape list, the
  lower bytes are kept raw (SplitZip); vectorised, ~1-2 GB/s per core each way.
- ``int8``: symmetric int8, keys per channel, values per token (KIVI), fp16 scales.
- ``cachegen``: CacheGen (SIGCOMM 2024): anchor/delta tokens, layer-dependent
  quantisation, range coding with per-(layer, channel) tables; ``level`` 0..5.
- ``kvtc``: KVTC-style transform coding (keys before RoPE, PCA per layer and K/V
  calibrated once per model, a step per (layer, K/V) by measured sensitivity, CacheGen's
  coder); ``get_codec("kvtc", level=L, model=MODEL_DIR)`` calibrates on first use and
  caches the calibration beside the model; each level's perplexity cost measured at
  calibration is stored with it (``level`` 0..7). Option ``first_token``: the position of
  the slice's first token (chunks of a prompt).

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvtransfer.codecs.base import (DTYPE_IDS, DTYPES_BY_ID, HEAD, MAGIC, REGISTRY, TAIL, VERSION, CodecError,
                                    KVCodec, Payload, name_of, parse)

__all__ = ["DTYPE_IDS", "DTYPES_BY_ID", "MAGIC", "VERSION", "CodecError", "KVCodec", "Payload", "calibrate",
           "decode_any", "decode_chunks", "encode_chunks", "get_codec", "parse", "split_chunks"]


def _codec_class(name: str) -> type[KVCodec]:
    mod, cls, _ = REGISTRY[name]
    out: type[KVCodec] = getattr(importlib.import_module(mod), cls)
    return out


def get_codec(name: str, **options: Any) -> KVCodec:
    """The codec called name (none, lossless, int8, cachegen, kvtc) with its options; unknown
    names or options raise ValueError naming what is allowed."""
    if name not in REGISTRY:
        raise ValueError(f"unknown codec {name!r}; allowed: {sorted(REGISTRY)}")
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
    for name, (_, _, c) in REGISTRY.items():
        if c == cid:
            return _codec_class(name)().decode(data)
    raise CodecError(f"KV stream names unknown codec id {cid}; known: "
                     f"{ {n: c for n, (_, _, c) in REGISTRY.items()} }")


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
