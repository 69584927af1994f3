import numpy as np
import pytest
import torch

from kvtransfer.codec import CodecError, get_codec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kv_like(dtype, tokens=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 2, tokens, 2, 16, generator=g) * torch.linspace(0.1, 4, 16)
    kv = base.to(dtype)
    flat = kv.view(-1)
    flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), -0.0, 1e-40
    return kv


def same_bits(a, b):
    ia = a.view(torch.int32 if a.dtype == torch.float32 else torch.int16)
    ib = b.view(torch.int32 if b.dtype == torch.float32 else torch.int16)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(ia, ib)


@pytest.mark.parametrize("name", ["none", "lossless"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 37, 64])
def test_bit_exact_round_trip(name, dtype, tokens):
    c = get_codec(name)
    kv = kv_like(dtype, tokens)
    assert same_bits(c.decode(c.encode(kv)), kv)


def test_lossless_is_smaller_on_skewed_exponents():
    kv = (torch.randn(4, 2, 256, 4, 64) * 0.5).to(torch.bfloat16)
    raw = len(get_codec("none").encode(kv))
    assert raw / len(get_codec("lossless").encode(kv)) > 1.25
    kv16 = (torch.randn(4, 2, 256, 4, 64) * 0.5).to(torch.float16)
    assert len(get_codec("none").encode(kv16)) / len(get_codec("lossless").encode(kv16)) > 1.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_error_bound(dtype):
    kv = torch.randn(2, 2, 50, 2, 16).to(dtype)
    c = get_codec("int8")
    out = c.decode(c.encode(kv))
    err = (out.float() - kv.float()).abs()
    k_scale = kv[:, 0].float().abs().amax(dim=1, keepdim=True) / 127
    assert (err[:, 0] <= k_scale * 0.5 + 1e-2).all()
    assert out.dtype == dtype and len(c.encode(kv)) < kv.numel() * 2


@pytest.mark.parametrize("name", ["none", "lossless", "int8"])
def test_corruption_truncation_magic(name):
    c = get_codec(name)
    data = bytearray(c.encode(kv_like(torch.bfloat16)))
    bad = bytearray(data)
    bad[-1] ^= 0x01
    with pytest.raises(CodecError, match="checksum"):
        c.decode(bytes(bad))
    with pytest.raises(CodecError, match="truncated"):
        c.decode(bytes(data[:-5]))
    with pytest.raises(CodecError, match="magic"):
        c.decode(b"XXXX" + bytes(data[4:]))
    with pytest.raises(CodecError, match="shorter"):
        c.decode(b"SSKC")


def test_chunks_code_independently():
    kv = kv_like(torch.float16, 64)
    c = get_codec("lossless")
    parts = [c.decode(c.encode(kv[:, :, i:i + 16])) for i in range(0, 64, 16)]
    assert same_bits(torch.cat(parts, dim=2), kv)


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match="allowed"):
        get_codec("zip")
    with pytest.raises(ValueError, match="takes options"):
        get_codec("int8", bits=4)
