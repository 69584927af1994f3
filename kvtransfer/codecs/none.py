"""``none``: the tensor's raw bytes, bit-exact."""

from __future__ import annotations

import numpy as np
import torch

from kvtransfer.codecs.base import KVCodec, Payload

# Unsigned view of each float format's bits (numpy) and the same-width torch int type.
UINT = {torch.float32: (np.uint32, torch.int32), torch.float16: (np.uint16, torch.int16),
        torch.bfloat16: (np.uint16, torch.int16)}


def bits_of(kv: torch.Tensor) -> np.ndarray:
    """The raw bit patterns of a contiguous CPU tensor as a flat unsigned numpy view."""
    np_u, t_i = UINT[kv.dtype]
    return kv.view(t_i).numpy().view(np_u).reshape(-1)


def tensor_from_bits(bits: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of bits_of; copies when bits is read-only (e.g. a view of the stream)."""
    _, t_i = UINT[dtype]
    if not bits.flags.writeable:
        bits = bits.copy()
    signed = bits.view(np.int32 if bits.dtype == np.uint32 else np.int16)
    return torch.from_numpy(signed).view(dtype).reshape(shape)


class NoneCodec(KVCodec):
    name, codec_id = "none", 0

    def _encode(self, kv: torch.Tensor) -> tuple[bytes, Payload]:
        return b"", bits_of(kv).tobytes()

    def _decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype,
                opts: bytes) -> torch.Tensor:
        np_u, _ = UINT[dtype]
        n = int(np.prod(shape))
        if len(payload) != n * np.dtype(np_u).itemsize:
            raise ValueError(f"payload is {len(payload)} bytes, {n} values need {n * np.dtype(np_u).itemsize}")
        return tensor_from_bits(np.frombuffer(payload, dtype=np_u), dtype, shape)
