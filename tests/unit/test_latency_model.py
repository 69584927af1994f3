from dataclasses import replace

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


# -- chunked prefill, step fits, serving overheads, attention/expert ping-pong ------------

from placement.attention_expert import AttentionExpert, pingpong_s  # noqa: E402
from placement.latency import Overheads, chunk_attention_work, fit_overheads, fit_prefill_steps  # noqa: E402


def test_chunk_attention_forms_agree_on_whole_prompts_and_differ_on_chunks():
    for kind in ("causal", "dense"):
        assert chunk_attention_work([1000], [0], kind) == 1000 * 1000
    # 1000 tokens as 512 + 488: a causal kernel does l^2 in all, a masked dense one less
    # (the second chunk's scores cover 1000 keys, not 512 + 2 * 488).
    causal = chunk_attention_work([512, 488], [0, 512], "causal")
    dense = chunk_attention_work([512, 488], [0, 512], "dense")
    assert causal == 1000 * 1000
    assert dense == 512 * 512 + 488 * 1000
    lm = LatencyModel(Coeffs(0.0, 0.0, 1e-9), Coeffs(0, 0, 0), attention="dense")
    assert abs(lm.chunked_prefill_s(1000, 512) - dense * 1e-9) < 1e-15


def _chunked_steps(true: LatencyModel, rng: np.random.Generator, n: int) -> list:
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        ns = rng.integers(16, 512, size=k).tolist()
        cs = [int(x) for x in rng.choice([0, 0, 256, 512, 1024, 1536], size=k)]
        out.append((ns, cs, true.mixed_s(ns, cs, 0, 0) * (1 + rng.normal(0, 0.01))))
    return out


def test_fit_prefill_steps_recovers_coefficients_of_chunked_batches():
    rng = np.random.default_rng(1)
    for kind in ("causal", "dense"):
        true = LatencyModel(Coeffs(2e-3, 4e-5, 6e-8), Coeffs(0, 0, 0), attention=kind)
        got = fit_prefill_steps(_chunked_steps(true, rng, 80), kind)
        for g, w in zip(got.as_tuple(), true.prefill.as_tuple()):
            assert abs(g - w) / w < 0.1, (kind, got, true.prefill)


def test_fit_steps_picks_the_attention_form_of_the_data():
    from placement.profile import fit_steps

    rng = np.random.default_rng(2)
    true = LatencyModel(Coeffs(1e-3, 2e-5, 8e-8), Coeffs(1e-3, 5e-7, 1e-4), attention="dense")
    steps = _chunked_steps(true, rng, 60)
    for b in (1, 2, 4, 8):
        for ctx in (100, 800, 1500):
            steps.append(([1] * b, [ctx] * b, true.decode_s(b, b * (ctx + 1))))
    prof = fit_steps(steps)
    assert prof["attention"] == "dense"
    assert prof["median_rel_error_prefill"] < 0.02
    assert abs(prof["decode"][2] - 1e-4) / 1e-4 < 0.05


def _probes(lat: LatencyModel, over: Overheads, disagg: bool, kv_s: float):
    iso, bursts = [], []
    for p in (64, 512, 1024, 1280):
        for o in (4, 40):
            ttft = lat.chunked_prefill_s(p, 512) + over.request_s + over.prompt_token_s * p
            ctx1 = int(np.mean([64, 512, 1024, 1280]) + np.mean([4, 40]) / 2)
            period = lat.decode_s(1, ctx1) + over.step_s + over.stream_token_s
            start = (over.decode_start_s + kv_s) if disagg else 0.0
            iso.append((p, o, ttft, ttft + start + (o - 1) * period))
    for b in (2, 4, 8):
        ctx = b * (64 + 20)
        period = lat.decode_s(b, ctx) + over.step_s + over.stream_token_s * b
        start = (over.decode_start_s + kv_s) if disagg else 0.0
        bursts.append((b, ctx, 40, start + 39 * period))
    return iso, bursts


def test_fit_overheads_recovers_known_overheads():
    lat = LatencyModel(Coeffs(1e-3, 2e-5, 8e-8), Coeffs(1.3e-3, 5e-7, 6e-5), attention="dense")
    want = Overheads(request_s=6e-3, prompt_token_s=4e-6, decode_start_s=5e-3, step_s=3e-4, stream_token_s=8e-4)
    iso, bursts = _probes(lat, want, True, kv_s=1e-3)
    got = fit_overheads(lat, 512, iso, bursts, disaggregated=True, kv_link_s=1e-3)
    for k in ("request_s", "prompt_token_s", "decode_start_s", "step_s", "stream_token_s"):
        assert abs(getattr(got, k) - getattr(want, k)) <= 0.02 * getattr(want, k) + 1e-9, (k, got, want)
    # Colocated: no decode start, even if the probes' decode looks late.
    got_c = fit_overheads(lat, 512, iso, bursts, disaggregated=False)
    assert got_c.decode_start_s == 0.0


def test_overheads_map_onto_cluster_spec_fields():
    from placement.simulator import ClusterSpec

    o = Overheads(1.0, 2.0, 3.0, 4.0, 5.0)
    spec = ClusterSpec([], **o.spec_kwargs())
    assert (spec.request_overhead_s, spec.prompt_token_overhead_s, spec.decode_start_overhead_s,
            spec.token_overhead_s, spec.stream_overhead_s) == (1.0, 2.0, 3.0, 4.0, 5.0)


def test_pingpong_one_micro_batch_is_the_sum_of_stages():
    assert abs(pingpong_s(2.0, 1.0, 0.1, 4, 1) - 4 * (2.0 + 1.0 + 0.2)) < 1e-12


def test_pingpong_hides_the_smaller_stage():
    ta, te, tc, layers, m = 2.0, 1.0, 0.1, 4, 3
    t = pingpong_s(ta, te, tc, layers, m)
    # The attention pool is never idle after the start: m * layers * ta, plus one fill
    # (the last micro-batch's experts and hops) -- MegaScale-Infer's formula.
    assert abs(t - ((ta + te + 2 * tc) + max(ta, te) * (m * layers - 1))) < 1e-9
    # Less than running the micro-batches' stages back to back.
    assert t < m * layers * (ta + te + 2 * tc)


def test_attention_expert_ratio_and_micro_batches():
    ae = AttentionExpert(attention=Coeffs(1e-4, 1e-7, 1e-5), expert=Coeffs(2e-4, 2e-5, 0.0),
                         comm=Coeffs(5e-5, 1e-7, 0.0), layers=8, top_k=2, n_attention=2, n_expert=1,
                         micro_batches=1)
    one = ae.step_s(64, 64 * 1000)
    ta, te, tc = ae.stage_times(64, 64 * 1000)
    assert abs(one - 8 * (ta + te + 2 * tc)) < 1e-12
    two = replace(ae, micro_batches=2).step_s(64, 64 * 1000)
    assert two < one  # overlap beats the serial pass
    # More expert workers shrink the expert stage (the ratio is a layout parameter).
    assert replace(ae, n_expert=4).stage_times(64, 64000)[1] < te
    # With m >= 2 the step follows the larger pool's time.
    a2 = replace(ae, micro_batches=2)
    assert abs(a2.step_s(64, 64000) - a2.closed_form_s(64, 64000)) / a2.closed_form_s(64, 64000) < 0.05


def test_fit_overheads_splits_inside_and_outside_the_worker():
    lat = LatencyModel(Coeffs(1e-3, 2e-5, 8e-8), Coeffs(1.3e-3, 5e-7, 6e-5), attention="dense")
    want = Overheads(request_s=5e-3, prompt_token_s=2e-6, step_s=3e-4, stream_token_s=8e-4,
                     prefill_token_s=1e-5, prefill_done_s=1e-3)
    iso, bursts = _probes(lat, replace(want, prefill_token_s=0.0, prefill_done_s=0.0), False, 0.0)
    # The worker's busy time holds the in-worker terms; TTFT holds both.
    busy = [lat.chunked_prefill_s(p, 512) + want.prefill_done_s + want.prefill_token_s * p for p, _, _, _ in iso]
    iso = [(p, o, ttft + b - lat.chunked_prefill_s(p, 512), e2e + b - lat.chunked_prefill_s(p, 512))
           for (p, o, ttft, e2e), b in zip(iso, busy)]
    got = fit_overheads(lat, 512, iso, bursts, disaggregated=False, prefill_busy=busy)
    for k in ("request_s", "prompt_token_s", "prefill_token_s", "prefill_done_s"):
        assert abs(getattr(got, k) - getattr(want, k)) <= 0.02 * getattr(want, k) + 1e-9, (k, got)
    # Without the busy times the same delay is all outside the worker.
    got2 = fit_overheads(lat, 512, iso, bursts, disaggregated=False)
    assert got2.prefill_token_s == 0.0 and got2.prompt_token_s > want.prompt_token_s


def test_attention_expert_fit_and_shared_cores() -> None:
    """ae_fit recovers the coefficients of lock-step steps it was made from; with fewer
    shared cores than workers, a ping-pong step takes at least all the work / cores."""
    from placement.attention_expert import ae_fit
    from placement.attention_expert import AttentionExpert
    from placement.latency import Coeffs

    true = AttentionExpert(Coeffs(1e-3, 0.0, 2e-5), Coeffs(5e-4, 1e-5, 0.0), Coeffs(1e-4, 1e-6, 0.0), 8, 2, 1, 2,
                           micro_batches=1)
    samples = []
    for b in (1, 4, 16, 64):
        ta, te, tc = true.stage_times(b, b * 128)
        samples.append((b, b * 128, 8 * ta, 8 * te, 16 * tc))
    fit = ae_fit(samples, layers=8, top_k=2, n_attention=1, n_expert=2, micro_batches=1)
    for b in (2, 32):
        assert abs(fit.step_s(b, b * 128) - true.step_s(b, b * 128)) < 1e-9 + 1e-6 * true.step_s(b, b * 128)
    free = AttentionExpert(fit.attention, fit.expert, fit.comm, 8, 2, 1, 2, micro_batches=2)
    shared = AttentionExpert(fit.attention, fit.expert, fit.comm, 8, 2, 1, 2, micro_batches=2, cores=2)
    ta, te, tc = shared.stage_times(16, 16 * 128)
    assert shared.step_s(16, 2048) == max(free.step_s(16, 2048), 2 * 8 * (ta + 2 * te + 2 * tc) / 2)
    assert shared.step_s(16, 2048) > free.step_s(16, 2048)
    # Batch 1 cannot split: 2 micro-batches run it in lock-step.
    assert free.step_s(1, 128) == AttentionExpert(fit.attention, fit.expert, fit.comm, 8, 2, 1, 2, 1).step_s(1, 128)
    # Enough cores for every worker: no change.
    assert AttentionExpert(fit.attention, fit.expert, fit.comm, 8, 2, 1, 2, 2, cores=3).step_s(16, 2048) == \
        free.step_s(16, 2048)
