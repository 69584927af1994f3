"""KV codecs: ``get_codec(name, **options)`` returns an object with
``encode(kv: Tensor) -> bytes`` and ``decode(data: bytes) -> Tensor``; ``kv`` is
``[layers, 2, tokens, kv_heads, head_dim]`` (2 = key, value) in fp32, fp16 or bf16.

Every stream is self-describing: a header (magic, version, codec, dtype, shape, options,
payload length, CRC32 of the payload) in front of the payload, so decoding needs no side
information and corrupted or truncated bytes raise ``CodecError`` instead of returning
garbage. Chunks of tokens are coded independently by encoding token slices, which is how
the adaptive controller picks a level per chunk.

- ``none``: the raw bytes, bit-exact.
- ``lossless``: bit-exact and smaller. Float KV has very skewed exponents (SplitZip, 2026):
  exponents are coded as indices into this tensor's most frequent values (rare ones in an
  escape list) while sign and mantissa bits are packed raw. Fully vectorised (numpy).
- ``int8``: symmetric int8, keys per channel and values per token (KIVI, 2024), fp16 scales.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import torch

MAGIC = b"SSKC"
VERSION = 1
_HEADER = struct.Struct("<4sBBBB5IIQI")  # magic ver codec dtype level shape*5 reserved len crc
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPES_BACK = {v: k for k, v in _DTYPES.items()}
_UINT = {torch.float32: (np.uint32, torch.int32), torch.float16: (np.uint16, torch.int16),
         torch.bfloat16: (np.uint16, torch.int16)}


class CodecError(ValueError):
    """Bytes that are not a valid KV stream: bad magic, version, length or checksum."""


def _bits(kv: torch.Tensor) -> np.ndarray:
    """The tensor's raw bit patterns as unsigned ints (a view where possible)."""
    np_u, t_i = _UINT[kv.dtype]
    return kv.contiguous().view(t_i).numpy().view(np_u).reshape(-1)


def _from_bits(bits: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    _, t_i = _UINT[dtype]
    signed = bits.view(np.int32 if bits.dtype == np.uint32 else np.int16)
    return torch.from_numpy(signed.copy()).view(dtype).reshape(shape)


class KVCodec:
    name = "base"
    codec_id = 255

    def __init__(self, level: int = 0) -> None:
        self.level = level

    def encode(self, kv: torch.Tensor) -> bytes:
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
        if kv.dtype not in _DTYPES:
            raise ValueError(f"kv dtype {kv.dtype} not supported; allowed: float32, float16, bfloat16")
        payload = self._encode(kv.detach().cpu().contiguous())
        head = _HEADER.pack(MAGIC, VERSION, self.codec_id, _DTYPES[kv.dtype], self.level, *kv.shape, 0,
                            len(payload), zlib.crc32(payload))
        return head + payload

    def decode(self, data: bytes | memoryview) -> torch.Tensor:
        data = memoryview(data)
        if len(data) < _HEADER.size:
            raise CodecError(f"KV stream is {len(data)} bytes, shorter than its {_HEADER.size}-byte header")
        magic, ver, cid, did, level, *rest = _HEADER.unpack_from(data)
        shape, length, crc = tuple(rest[:5]), rest[6], rest[7]
        if magic != MAGIC:
            raise CodecError(f"not a KV stream: magic {bytes(magic)!r}, expected {MAGIC!r}")
        if ver != VERSION:
            raise CodecError(f"KV stream version {ver}; this build reads version {VERSION}")
        if cid != self.codec_id:
            raise CodecError(f"KV stream was written by codec id {cid}, not {self.name} ({self.codec_id})")
        if did not in _DTYPES_BACK:
            raise CodecError(f"KV stream has unknown dtype id {did}")
        payload = data[_HEADER.size:]
        if len(payload) != length:
            raise CodecError(f"KV stream truncated: payload {len(payload)} bytes, header says {length}")
        if zlib.crc32(payload) != crc:
            raise CodecError("KV stream failed its checksum (corrupted)")
        try:
            return self._decode(payload, shape, _DTYPES_BACK[did], level)
        except (ValueError, IndexError) as e:
            raise CodecError(f"KV stream payload is malformed: {e}") from None

    def _encode(self, kv: torch.Tensor) -> bytes:
        raise NotImplementedError

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, level: int) -> torch.Tensor:
        raise NotImplementedError


class NoneCodec(KVCodec):
    name, codec_id = "none", 0

    def _encode(self, kv: torch.Tensor) -> bytes:
        return _bits(kv).tobytes()

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, level: int) -> torch.Tensor:
        np_u, _ = _UINT[dtype]
        return _from_bits(np.frombuffer(payload, dtype=np_u), dtype, shape)


# Exponent field of each float format: (shift, mask, index bits).
_EXP = {torch.bfloat16: (7, 0xFF, 4), torch.float16: (10, 0x1F, 3), torch.float32: (23, 0xFF, 4)}


def _pack(idx: np.ndarray, bits: int) -> bytes:
    """Pack small ints (< 2**bits, bits 3 or 4) densely."""
    per = 2 if bits == 4 else 8
    pad = (-len(idx)) % per
    v = np.concatenate([idx, np.zeros(pad, np.uint8)]) if pad else idx
    if bits == 4:
        return ((v[0::2] << 4) | v[1::2]).astype(np.uint8).tobytes()
    g = v.reshape(-1, 8).astype(np.uint32)
    word = np.zeros(len(g), np.uint32)
    for i in range(8):
        word |= g[:, i] << (21 - 3 * i)
    return np.stack([(word >> 16) & 0xFF, (word >> 8) & 0xFF, word & 0xFF], 1).astype(np.uint8).tobytes()


def _unpack(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 4:
        out = np.empty(len(buf) * 2, np.uint8)
        out[0::2], out[1::2] = buf >> 4, buf & 0x0F
        return out[:n]
    b = buf.reshape(-1, 3).astype(np.uint32)
    word = (b[:, 0] << 16) | (b[:, 1] << 8) | b[:, 2]
    out = np.empty((len(word), 8), np.uint8)
    for i in range(8):
        out[:, i] = (word >> (21 - 3 * i)) & 0x7
    return out.reshape(-1)[:n]


class LosslessCodec(KVCodec):
    """Exponents as indices into this tensor's most frequent exponents (escape list for
    the rest); sign and mantissa bits kept raw."""

    name, codec_id = "lossless", 1

    def _encode(self, kv: torch.Tensor) -> bytes:
        u = _bits(kv)
        shift, mask, bits = _EXP[kv.dtype]
        escape = (1 << bits) - 1
        exp = ((u >> shift) & mask).astype(np.uint8)
        counts = np.bincount(exp, minlength=mask + 1)
        table = np.argsort(-counts, kind="stable")[:escape].astype(np.uint8)
        lut = np.full(mask + 1, escape, np.uint8)
        lut[table] = np.arange(len(table), dtype=np.uint8)
        idx = lut[exp]
        escapes = exp[idx == escape]
        rest = u & ~np.array(mask << shift, dtype=u.dtype)  # sign and mantissa, exponent zeroed
        if kv.dtype == torch.bfloat16:   # sign at bit 15, mantissa bits 0-6 -> one byte
            rest_b = (((rest >> 8) & 0x80) | (rest & 0x7F)).astype(np.uint8).tobytes()
        elif kv.dtype == torch.float32:  # sign at 31, mantissa 0-22 -> three bytes
            r = ((rest >> 8) & 0x800000) | (rest & 0x7FFFFF)
            rest_b = np.stack([(r >> 16) & 0xFF, (r >> 8) & 0xFF, r & 0xFF], 1).astype(np.uint8).tobytes()
        else:                            # fp16: sign 15, mantissa 0-9: low byte + 3 bits packed with idx
            rest_b = (rest & 0xFF).astype(np.uint8).tobytes()
            hi = (((rest >> 13) & 0x4) | ((rest >> 8) & 0x3)).astype(np.uint8)
            idx = (hi << 3) | idx  # 6 bits: packed as two 3-bit fields
            return (np.array([len(table)], np.uint8).tobytes() + table.tobytes().ljust(escape, b"\0")
                    + struct.pack("<Q", len(escapes)) + rest_b + _pack(idx >> 3, 3) + _pack(idx & 7, 3)
                    + escapes.tobytes())
        return (np.array([len(table)], np.uint8).tobytes() + table.tobytes().ljust(escape, b"\0")
                + struct.pack("<Q", len(escapes)) + rest_b + _pack(idx, bits) + escapes.tobytes())

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, level: int) -> torch.Tensor:
        shift, mask, bits = _EXP[dtype]
        escape = (1 << bits) - 1
        n = int(np.prod(shape))
        buf = np.frombuffer(payload, np.uint8)
        np_u, _ = _UINT[dtype]
        table = np.zeros(escape + 1, np_u)
        table[:escape] = buf[1:1 + escape]
        pos = 1 + escape
        (n_esc,) = struct.unpack_from("<Q", payload, pos)
        pos += 8
        if dtype == torch.float32:
            r = buf[pos:pos + 3 * n].reshape(n, 3).astype(np.uint32)
            pos += 3 * n
            r = (r[:, 0] << 16) | (r[:, 1] << 8) | r[:, 2]
            rest = ((r & 0x800000) << 8) | (r & 0x7FFFFF)
        elif dtype == torch.bfloat16:
            r = buf[pos:pos + n].astype(np.uint16)
            pos += n
            rest = ((r & 0x80) << 8) | (r & 0x7F)
        else:
            low = buf[pos:pos + n].astype(np.uint16)
            pos += n
        if dtype == torch.float16:
            size3 = ((n + 7) // 8) * 3
            hi = _unpack(buf[pos:pos + size3], 3, n).astype(np.uint16)
            idx = _unpack(buf[pos + size3:pos + 2 * size3], 3, n)
            pos += 2 * size3
            rest = ((hi & 0x4) << 13) | ((hi & 0x3) << 8) | low
        else:
            size = (n + 1) // 2
            idx = _unpack(buf[pos:pos + size], 4, n)
            pos += size
        esc = buf[pos:pos + n_esc]
        if len(esc) != n_esc or pos + n_esc != len(buf):
            raise ValueError("escape list length does not match the payload")
        exp = table[idx]
        where = idx == escape
        if int(where.sum()) != n_esc:
            raise ValueError("escape count does not match the index stream")
        exp[where] = esc
        exp <<= shift
        exp |= rest.astype(np_u, copy=False)
        u = exp
        return _from_bits(u, dtype, shape)


class Int8Codec(KVCodec):
    """Keys per channel (over tokens), values per token (over head_dim); fp16 scales."""

    name, codec_id = "int8", 2

    def _encode(self, kv: torch.Tensor) -> bytes:
        x = kv.float()
        k, v = x[:, 0], x[:, 1]  # [L, T, H, D]
        ks = (k.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8).half()
        vs = (v.abs().amax(dim=3, keepdim=True) / 127).clamp_min(1e-8).half()
        kq = torch.round(k / ks.float()).clamp(-127, 127).to(torch.int8)
        vq = torch.round(v / vs.float()).clamp(-127, 127).to(torch.int8)
        return b"".join(t.contiguous().numpy().tobytes() for t in (ks, vs, kq, vq))

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, level: int) -> torch.Tensor:
        L, _, T, H, D = shape
        parts, pos = [], 0
        for shp, np_t in (((L, 1, H, D), np.float16), ((L, T, H, 1), np.float16),
                          ((L, T, H, D), np.int8), ((L, T, H, D), np.int8)):
            n = int(np.prod(shp)) * np.dtype(np_t).itemsize
            parts.append(torch.from_numpy(np.frombuffer(payload[pos:pos + n], np_t).reshape(shp).copy()))
            pos += n
        if pos != len(payload):
            raise ValueError(f"int8 payload is {len(payload)} bytes, expected {pos}")
        ks, vs, kq, vq = parts
        return torch.stack([kq.float() * ks.float(), vq.float() * vs.float()], dim=1).to(dtype)


_CODECS: dict[str, type[KVCodec]] = {"none": NoneCodec, "lossless": LosslessCodec, "int8": Int8Codec}


def get_codec(name: str, **options: Any) -> KVCodec:
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; allowed: {sorted(_CODECS)}")
    allowed = {"level"}
    bad = set(options) - allowed
    if bad:
        raise ValueError(f"codec {name!r} takes options {sorted(allowed)}; got {sorted(bad)}")
    return _CODECS[name](**options)


def decode_any(data: bytes | memoryview) -> torch.Tensor:
    """Decode a stream written by any codec (the header names it)."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise CodecError(f"KV stream is {len(view)} bytes, shorter than its {_HEADER.size}-byte header")
    cid = view[5]
    for cls in _CODECS.values():
        if cls.codec_id == cid:
            return cls().decode(view)
    raise CodecError(f"KV stream names unknown codec id {cid}")
