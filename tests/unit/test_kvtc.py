"""kvtc: round trip shapes and dtypes, exact head token, error within the step, level
monotonicity of size, calibration fingerprint checks, corrupted streams, and the model
calibration cached beside a (tiny) model. Quality on a real model is a benchmark
(benchmarks/kv_quality.py), not a test."""

import shutil

import numpy as np
import pytest
import torch

from benchmarks.codec_bench import synthetic_kv
from kvtransfer.codec import CodecError, get_codec
from kvtransfer.codecs.kvtc import calibrate_model
from kvtransfer.codecs.kvtc_calib import LEVEL_F, KVTCCalibration, cache_path, calibrate_kv


@pytest.fixture(scope="module")
def calib():
    return calibrate_kv(synthetic_kv(layers=3, tokens=256, heads=2, dim=16, token_seed=1))


@pytest.fixture(scope="module")
def kv():
    return synthetic_kv(layers=3, tokens=100, heads=2, dim=16, token_seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_shape_dtype_and_error_bound(calib, kv, dtype):
    x = kv.to(dtype)
    codec = get_codec("kvtc", level=3, calibration=calib)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y[:, :, 0], x[:, :, 0])  # the attention sink token is exact
    # orthonormal basis: the error of a token's features is at most sqrt(C) * step / 2
    step = torch.from_numpy(calib.steps(3, 0, 3))[:, :, None]
    err = (y[:, :, 1:].float() - x[:, :, 1:].float()).flatten(3).norm(dim=-1)
    tol = step * 0.5 * (2 * 16) ** 0.5 + 0.02 * x.float().abs().amax()  # + the 16-bit cast
    assert bool((err <= tol).all())


def test_size_falls_and_error_grows_with_level(calib, kv):
    sizes, errs = [], []
    for lv in range(len(LEVEL_F)):
        c = get_codec("kvtc", level=lv, calibration=calib)
        data = c.encode(kv)
        sizes.append(len(data))
        errs.append(float((c.decode(data) - kv).norm()))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert errs == sorted(errs)


def test_layer_slices_decode_like_the_whole(calib, kv):
    whole = get_codec("kvtc", level=2, calibration=calib)
    part = get_codec("kvtc", level=2, calibration=calib, first_layer=1, total_layers=3)
    a = whole.decode(whole.encode(kv))
    b = part.decode(part.encode(kv[1:2]))
    assert torch.allclose(a[1:2], b, atol=1e-5)


def test_other_calibration_raises(calib, kv):
    data = get_codec("kvtc", level=2, calibration=calib).encode(kv)
    other = calibrate_kv(synthetic_kv(layers=3, tokens=256, heads=2, dim=16, token_seed=5))
    assert other.fingerprint != calib.fingerprint
    with pytest.raises(CodecError, match="calibration"):
        get_codec("kvtc", level=2, calibration=other).decode(data)


def test_wrong_shape_and_missing_calibration_raise(calib):
    with pytest.raises(ValueError, match="kv_heads"):
        get_codec("kvtc", calibration=calib).encode(torch.zeros(3, 2, 4, 4, 16))
    with pytest.raises(ValueError, match="calibration"):
        get_codec("kvtc", level=1).encode(torch.zeros(3, 2, 4, 2, 16))
    with pytest.raises(ValueError, match="level"):
        get_codec("kvtc", level=len(LEVEL_F), calibration=calib)


def test_corrupted_stream_raises(calib, kv):
    codec = get_codec("kvtc", level=2, calibration=calib)
    data = bytearray(codec.encode(kv))
    for pos in (10, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(CodecError):
            codec.decode(bytes(bad))
    with pytest.raises(CodecError):
        codec.decode(bytes(data[:-3]))


def test_non_finite_kv_raises(calib, kv):
    x = kv.clone()
    x[1, 0, 5, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        get_codec("kvtc", calibration=calib).encode(x)


def test_unknown_codec_lists_every_registered_one():
    with pytest.raises(ValueError) as e:
        get_codec("kvtx")
    for name in ("none", "lossless", "int8", "cachegen", "kvtc"):
        assert name in str(e.value)


def test_save_load_keeps_fingerprint(calib, tmp_path):
    calib.save(tmp_path / "c.npz")
    back = KVTCCalibration.load(tmp_path / "c.npz")
    assert back.fingerprint == calib.fingerprint
    assert np.array_equal(back.basis, calib.basis)


def test_model_calibration_cached_beside_the_model(tmp_path):
    """calibrate_model runs the model on the calibration texts and measures every level's
    perplexity cost; get_codec(model=DIR) then loads it from beside the model."""
    from models.builtin import builtin_model_dir

    src = builtin_model_dir("tiny-llama")
    d = tmp_path / "model"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("kvtc-*"))
    cal = calibrate_model(d, windows=1, ctx=96, cont=16, measure_windows=1, measure_ctx=96, measure_cont=16)
    assert np.isfinite(cal.ppl_cost_pct).all() and np.isfinite(cal.kl).all()
    costs = cal.costs()  # the quality rule over kvtc's and cachegen's measured levels
    assert {"int8", "kvtc:0", "kvtc:7", "cachegen:0", "cachegen:3"} <= set(costs)
    assert costs["kvtc:7"] >= costs["kvtc:0"] > 0 and cal.q_stats.shape[1:] == (1, 4)
    assert cal.kl[-1] >= cal.kl[0]
    cal.save(cache_path(d))
    codec = get_codec("kvtc", level=1, model=d)
    assert codec.calibration.fingerprint == cal.fingerprint
    kv = torch.randn(cal.layers, 2, 20, cal.kv_heads, cal.head_dim)
    assert codec.decode(codec.encode(kv)).shape == kv.shape
    # a model whose weights changed is recalibrated, not silently paired with the old basis
    from kvtransfer.codecs.kvtc_calib import model_fingerprint

    assert model_fingerprint(d) == cal.model_fingerprint
    (d / "config.json").write_text((d / "config.json").read_text() + " ")
    assert model_fingerprint(d) != cal.model_fingerprint


def test_decode_any_uses_the_loaded_calibration_the_stream_names(calib, kv):
    from kvtransfer.codec import decode_any
    from kvtransfer.codecs import kvtc

    codec = get_codec("kvtc", level=2, calibration=calib)  # loads (registers) calib
    data = codec.encode(kv)
    assert torch.equal(decode_any(data), codec.decode(data))
    kvtc._LOADED.pop(calib.fingerprint)
    try:
        with pytest.raises(CodecError, match="not loaded"):
            decode_any(data)
    finally:
        kvtc.register(calib)


def test_sensitivity_weights_give_sensitive_tensors_finer_steps():
    from kvtransfer.codecs.kvtc_calib import WEIGHT_RANGE, sensitivity_weights

    kl = np.array([[1.0, 1.0], [4.0, 1.0], [1.0, 0.25], [1e6, 1.0]])
    w = sensitivity_weights(kl)
    assert w[1, 0] < w[0, 0] < w[2, 1]  # more KL per step^2 -> finer step
    assert abs(float(np.log(w).mean())) < 1e-6
    assert w.max() / w.min() <= WEIGHT_RANGE[1] / WEIGHT_RANGE[0] + 1e-6


def _rope_kv(T=256, L=2, H=2, D=16, seed=0):
    """KV whose keys are nearly constant before RoPE (a rotating signal after it), with
    the model-like frequencies of a head_dim-16 model."""
    from kvtransfer.codecs.kvtc_calib import rope_keys

    g = torch.Generator().manual_seed(seed)
    inv = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    pre = 3 * torch.randn(L, 1, H, D, generator=torch.Generator().manual_seed(99)) + 0.1 * torch.randn(L, T, H, D,
                                                                                                      generator=g)
    vals = torch.randn(L, T, H, D, generator=g)
    return torch.stack([rope_keys(pre, 0, inv, 1), vals], dim=1), inv


def test_rope_keys_is_the_engines_rotation_and_its_inverse():
    from engine.rope import apply_rotary
    from kvtransfer.codecs.kvtc_calib import rope_keys

    kv, inv = _rope_kv(T=40)
    x = kv[0, 1]  # [T, H, D]
    pos = torch.arange(7, 47).float()
    freqs = pos[:, None] * torch.from_numpy(inv)[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    ref = apply_rotary(x, emb.cos(), emb.sin())
    got = rope_keys(x[None], 7, inv, 1)[0]
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(rope_keys(got[None], 7, inv, -1)[0], x, atol=1e-5)


def test_keys_coded_before_rope_are_smaller_and_land_at_their_position():
    """A calibration with the model's RoPE frequencies codes keys before RoPE: on keys
    that are a rotating copy of one vector it codes smaller at no larger error; a slice
    coded at its position (first_token) decodes in place, via decode_any too, and the
    stream carries the position."""
    from kvtransfer.codec import decode_any

    kv, inv = _rope_kv()
    post, pre = calibrate_kv(kv), calibrate_kv(kv, inv_freq=inv)
    pre.rms = post.rms.copy()  # the same absolute steps (levels scale the step by the spread)
    pre.__dict__.pop("fingerprint", None)
    x = kv[:, :, 100:164]
    out = {}
    for name, cal in (("post", post), ("pre", pre)):
        c = get_codec("kvtc", level=3, calibration=cal, first_token=100)
        data = c.encode(x)
        y = c.decode(data)
        out[name] = (len(data), float((y - x).norm() / x.norm()))
        if name == "pre":
            assert torch.equal(decode_any(data), y)
            assert torch.equal(y[:, :, 0], x[:, :, 0])
            # the receiver needs no position: the stream carries it
            assert torch.equal(get_codec("kvtc", level=3, calibration=cal).decode(data), y)
    assert out["pre"][0] < 0.9 * out["post"][0], out  # values (half the stream) code alike
    assert out["pre"][1] <= out["post"][1], out


def test_concurrent_first_use_calibrates_once(tmp_path, monkeypatch):
    """Workers starting together: one computes the calibration under a file lock, the
    others wait and load its file."""
    import threading
    import time

    from kvtransfer.codecs import kvtc, kvtc_model
    from kvtransfer.codecs.kvtc_calib import model_fingerprint

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 100)
    calls = []

    def fake_calibrate(model_dir):  # the real one runs a model: tested above on tiny-llama
        calls.append(model_dir)
        time.sleep(0.5)
        cal = calibrate_kv(synthetic_kv(layers=2, tokens=64, heads=2, dim=16, token_seed=1))
        cal.model_fingerprint = model_fingerprint(model_dir)
        return cal

    monkeypatch.setattr(kvtc_model, "calibrate_model", fake_calibrate)
    got = []
    threads = [threading.Thread(target=lambda: got.append(kvtc.load_or_calibrate(d, timeout_s=30))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and len(got) == 3
    assert len({c.fingerprint for c in got}) == 1
    assert cache_path(d).exists()
