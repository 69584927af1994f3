"""``int8``: symmetric int8 quantisation, keys per channel (scale over tokens) and values
per token (scale over head_dim), as in KIVI (2024); fp16 scales. The baseline that
``cachegen`` is measured against.

Error bound: |x - decode(encode(x))| <= scale / 2 per element (before the cast back to a
16-bit dtype), with scale = max|x| / 127 over the key channel or value token. Non-finite
values cannot be quantised: encode raises ValueError (use ``lossless`` for such KV).
"""

from __future__ import annotations

import numpy as np
import torch

from kvtransfer.codecs.base import KVCodec, Payload

# Smallest positive fp16 (subnormal): scales never round to zero.
_MIN_SCALE = 2.0 ** -24


def fp16_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127 as fp16, rounded up so that |x| / scale <= 127 (no clipping)."""
    want = (amax / 127).clamp(min=_MIN_SCALE, max=65504.0)
    s = want.half()
    low = s.float() < want
    if bool(low.any()):
        s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return s


def check_finite(kv: torch.Tensor, codec: str) -> None:
    if not bool(torch.isfinite(kv).all()):
        raise ValueError(f"{codec} codes finite KV only; this tensor holds NaN or inf (use 'lossless')")


class Int8Codec(KVCodec):
    name, codec_id = "int8", 2

    def _encode(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        x = kv.float()
        check_finite(x, self.name)
        k, v = x[:, 0], x[:, 1]  # [L, T, H, D]
        L, T, H, D = k.shape
        ks = fp16_scale(k.abs().amax(dim=1, keepdim=True) if T else torch.zeros(L, 1, H, D))
        vs = fp16_scale(v.abs().amax(dim=3, keepdim=True))
        kq = torch.round(k / ks.float()).clamp(-127, 127).to(torch.int8)
        vq = torch.round(v / vs.float()).clamp(-127, 127).to(torch.int8)
        return b"", [t.contiguous().numpy() for t in (ks, vs, kq, vq)]

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                opts: bytes) -> torch.Tensor:
        L, _, T, H, D = shape
        parts, pos = [], 0
        for shp, np_t in (((L, 1, H, D), np.float16), ((L, T, H, 1), np.float16),
                          ((L, T, H, D), np.int8), ((L, T, H, D), np.int8)):
            n = int(np.prod(shp)) * np.dtype(np_t).itemsize
            if pos + n > len(payload):
                raise ValueError(f"int8 payload is {len(payload)} bytes, its fields need more than {pos + n}")
            parts.append(torch.from_numpy(np.frombuffer(payload[pos:pos + n], np_t).reshape(shp).copy()))
            pos += n
        if pos != len(payload):
            raise ValueError(f"int8 payload is {len(payload)} bytes, expected {pos}")
        ks, vs, kq, vq = parts
        return torch.stack([kq.float() * ks.float(), vq.float() * vs.float()], dim=1).to(dtype)
