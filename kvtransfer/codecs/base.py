"""What the codec front (``kvtransfer.codec``) and the codecs (``kvtransfer.codecs.*``)
share: the stream header and its checks, ``KVCodec`` (the base class every codec
subclasses), ``CodecError`` and the registry of codec names. It imports nothing of the
project, so the codecs and the front import it, never each other (no import cycle).
The stream format is described in ``kvtransfer.codec``.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, ClassVar

import numpy as np
import torch

MAGIC = b"SSKC"
VERSION = 3
# magic, version, codec id, dtype id, reserved, shape x5, options length
HEAD = struct.Struct("<4sBBBB5IH")
TAIL = struct.Struct("<QI")  # payload length, CRC32
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES_BY_ID = {v: k for k, v in DTYPE_IDS.items()}
# Bytes-like buffers (numpy arrays included), joined once into the stream.
Payload = Any
# codec name -> (module, class name, codec id); modules are imported by name, on first use.
REGISTRY: dict[str, tuple[str, str, int]] = {
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
        head = HEAD.pack(MAGIC, VERSION, self.codec_id, DTYPE_IDS[kv.dtype], 0, *kv.shape, len(opts)) + opts
        crc = zlib.crc32(head + struct.pack("<Q", length))
        for p in parts:
            crc = zlib.crc32(p, crc)
        return b"".join([head, TAIL.pack(length, crc), *parts])

    def decode(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        cid, dtype, shape, opts, payload = parse(data)
        if cid != self.codec_id:
            raise CodecError(f"KV stream was written by codec id {cid} ({name_of(cid)}), "
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
    if len(view) < HEAD.size:
        raise CodecError(f"KV stream is {len(view)} bytes, shorter than its {HEAD.size}-byte header")
    _, ver, cid, did, _, *rest = HEAD.unpack_from(view)
    shape, n_opts = tuple(rest[:5]), rest[5]
    if ver != VERSION:
        raise CodecError(f"KV stream version {ver}; this build reads version {VERSION}")
    end_head = HEAD.size + n_opts
    if len(view) < end_head + TAIL.size:
        raise CodecError(f"KV stream truncated: {len(view)} bytes, its header alone needs {end_head + TAIL.size}")
    length, crc = TAIL.unpack_from(view, end_head)
    payload = view[end_head + TAIL.size:]
    if len(payload) != length:
        raise CodecError(f"KV stream truncated: payload {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload, zlib.crc32(view[:end_head + 8])) != crc:
        raise CodecError("KV stream failed its CRC32 checksum (corrupted in header or payload)")
    if did not in DTYPES_BY_ID:
        raise CodecError(f"KV stream has unknown dtype id {did}")
    if shape[1] != 2:
        raise CodecError(f"KV stream shape {shape} is not [layers, 2, tokens, kv_heads, head_dim]")
    return cid, DTYPES_BY_ID[did], shape, bytes(view[HEAD.size:end_head]), payload


def name_of(cid: int) -> str:
    return next((n for n, (_, _, c) in REGISTRY.items() if c == cid), "unknown")
