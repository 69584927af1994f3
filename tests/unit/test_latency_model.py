import numpy as np

from placement.catalogue import gpu, opt
from placement.latency import Coeffs, LatencyModel, fit_decode, fit_prefill, kv_transfer_s, roofline


def test_fit_recovers_coefficients_from_noisy_samples():
    rng = np.random.default_rng(0)
    true = LatencyModel(Coeffs(0.01, 2e-4, 3e-8), Coeffs(0.005, 1e-6, 4e-4))
    ps = []
    for _ in range(60):
        lens = rng.integers(16, 2048, size=rng.integers(1, 5)).tolist()
        ps.append((lens, true.prefill_s(lens) * (1 + rng.normal(0, 0.01))))
    ds = []
    for _ in range(60):
        b = int(rng.integers(1, 64))
        ctx = int(rng.integers(b * 16, b * 2048))
        ds.append((b, ctx, true.decode_s(b, ctx) * (1 + rng.normal(0, 0.01))))
    p, d = fit_prefill(ps), fit_decode(ds)
    for got, want in zip(p.as_tuple() + d.as_tuple(), true.prefill.as_tuple() + true.decode.as_tuple()):
        assert abs(got - want) / want < 0.15, (got, want)


def test_fit_never_negative():
    c = fit_decode([(1, 100, 0.01), (2, 200, 0.0101), (4, 400, 0.0099)])
    assert min(c.as_tuple()) >= 0


def test_roofline_orders_of_magnitude_opt13b_a100():
    m = roofline(opt("13b"), gpu("a100-80g"))
    # 13B fp16 weights = 26 GB at ~1.4 TB/s: ~19 ms per decode step at batch 1.
    assert 0.01 < m.decode_s(1, 512) < 0.03
    # A 512-token prompt: ~2 * 13e9 * 512 flops at ~156 TFLOP/s: ~85 ms + weight read.
    assert 0.05 < m.prefill_s([512]) < 0.2
    # TP halves the per-token terms and adds communication.
    m2 = roofline(opt("13b"), gpu("a100-80g"), tp=2)
    assert m2.decode_s(1, 512) < m.decode_s(1, 512)


def test_kv_transfer_term():
    # OPT-13B: 800 KiB per token; 1000 tokens over 25 GB/s = ~33 ms.
    assert abs(kv_transfer_s(opt("13b"), 1000, 25) - 0.0328) < 0.001
    assert kv_transfer_s(opt("13b"), 1000, 25, codec_ratio=0.25) < 0.01
