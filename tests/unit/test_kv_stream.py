"""Layer-wise KV streaming: the engine hands over exactly the KV it computes, the sender
and receiver move it through a real gRPC KVServer piece by piece, a suffix left for the
decode worker to recompute gives the same greedy output, and failures are errors."""

import threading
import time

import pytest
import torch

from models.make import make_model
from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from kvtransfer import grpc_transport as gt
from kvtransfer.adaptive import RECOMPUTE, CodecOption, LinkEstimate
from kvtransfer.connector import KVTransferError
from kvtransfer.policy import PolicySpec, TransferPolicy
from kvtransfer.stream import StreamPlan, StreamSender, receive_stream

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture
def server():
    s = gt.KVServer("127.0.0.1", 0)
    yield s
    s.stop(0)


def prompt(n, seed=0):
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_engine(d, budget=24, blocks=64):
    return LLMEngine.from_model_dir(d, num_blocks=blocks, block_size=4, scheduler_config=SchedulerConfig(
        max_num_batched_tokens=budget, prefill_only=True, max_model_len=8192))


def run(engine):
    outs = []
    while engine.has_work:
        outs.append(engine.step())
    return outs


def test_streamed_layers_equal_the_exported_kv_even_with_prefix_hits(model_dir):
    eng = prefill_engine(model_dir)
    shared = prompt(40, 1)
    eng.add_request("warm", shared, GREEDY)
    run(eng)
    got: dict[int, list[tuple[int, torch.Tensor]]] = {}
    eng.runner.on_layer_kv = lambda rid, layer, first, kv: got.setdefault(layer, []).append((first, kv.clone()))
    p = shared + prompt(30, 2)  # 40 cached tokens (block-aligned), 30 new, 3 steps of 24
    eng.add_request("s", p, GREEDY, stream_kv=True)
    run(eng)
    ref = prefill_engine(model_dir)
    ref.add_request("r", p, GREEDY)
    want = next(o.exported_kv["r"] for o in run(ref) if "r" in o.exported_kv)
    assert sorted(got) == list(range(want.shape[0]))
    for layer, pieces in got.items():
        assert pieces[0][0] == 0  # cached tokens are handed over too
        assert [f for f, _ in pieces] == sorted(f for f, _ in pieces)
        kv = torch.cat([k for _, k in pieces], dim=1)
        assert kv.shape[1] == len(p)
        torch.testing.assert_close(kv, want[layer])


def test_partial_kv_import_recomputes_the_suffix_exactly(model_dir):
    p = prompt(37, 3)
    pre = prefill_engine(model_dir)
    pre.add_request("a", p, GREEDY)
    outs = run(pre)
    kv = next(o.exported_kv["a"] for o in outs if "a" in o.exported_kv)
    first = next(o.new_tokens["a"] for o in outs if "a" in o.new_tokens)
    mono = LLMEngine.from_model_dir(model_dir, num_blocks=64, block_size=4,
                                    scheduler_config=SchedulerConfig(max_num_batched_tokens=16, max_model_len=8192))
    want = mono.generate([p], GREEDY)[0]
    for keep in (37, 20, 9, 0):
        dec = LLMEngine.from_model_dir(model_dir, num_blocks=64, block_size=4, scheduler_config=SchedulerConfig(
            max_num_batched_tokens=16, max_model_len=8192))
        seq = dec.add_request("d", p, GREEDY, output_token_ids=[first],
                              pending_kv=kv[:, :, :keep] if keep else None)
        run(dec)
        assert seq.output_token_ids == want, keep


def _send(server, kv, plan, pieces_of=7, rid="r"):
    """Feed the sender like the engine does: layer by layer, in uneven steps."""
    sender = StreamSender(server)
    h = sender.begin(rid, tuple(kv.shape), str(kv.dtype).removeprefix("torch."), "10.0.0.2", lambda n: plan)
    t = kv.shape[2]
    for start in range(0, t, pieces_of):
        for layer in range(kv.shape[0]):
            sender.add(rid, layer, start, kv[layer, :, start:start + pieces_of].clone())
    sender.end(rid)
    return sender, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("codec", ["none", "lossless"])
def test_exact_codecs_stream_bit_exactly(server, dtype, codec):
    kv = torch.randn(3, 2, 45, 2, 8).to(dtype)
    _send(server, kv, StreamPlan([codec] * 3, 16))
    got = receive_stream(gt_handle(server, kv), 10)
    assert got.kv_tokens == 45 and got.attempts == 1
    assert torch.equal(got.kv.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       kv.view(torch.int16 if dtype != torch.float32 else torch.int32))


def gt_handle(server, kv):
    from kvtransfer.connector import KVHandle

    return KVHandle("r", tuple(kv.shape), str(kv.dtype).removeprefix("torch."), 0, "grpc", server.address)


def test_mixed_levels_and_a_recomputed_suffix(server):
    kv = torch.randn(2, 2, 50, 2, 16)
    plan = StreamPlan(["none", "cachegen:2", "int8", RECOMPUTE], 16)
    _send(server, kv, plan)
    got = receive_stream(gt_handle(server, kv), 10)
    assert got.kv_tokens == 48 and got.choices == plan.choices
    assert torch.equal(got.kv[:, :, :16], kv[:, :, :16])
    err = (got.kv[:, :, 16:48] - kv[:, :, 16:48]).norm() / kv[:, :, 16:48].norm()
    assert 0 < err < 0.2


def test_a_corrupted_stream_is_fetched_again_once(server):
    kv = torch.randn(2, 2, 20, 2, 8)
    _send(server, kv, StreamPlan(["none", "none"], 16))
    server.fault = ("corrupt", 1)
    got = receive_stream(gt_handle(server, kv), 10)
    assert got.attempts == 2 and torch.equal(got.kv, kv)
    _, h = _send(server, kv, StreamPlan(["none", "none"], 16), rid="r2")
    server.fault = ("corrupt", 2)
    with pytest.raises(KVTransferError, match="2 attempt.*checksum"):
        receive_stream(h, 10)


def test_sender_abort_reaches_the_receiver_before_the_deadline(server):
    kv = torch.randn(2, 2, 20, 2, 8)
    sender = StreamSender(server)
    h = sender.begin("r", tuple(kv.shape), "float32", None, lambda n: StreamPlan(["none", "none"], 16))
    sender.add("r", 0, 0, kv[0, :, :10].clone())
    threading.Timer(0.3, sender.abort, args=("r", "prefill worker died")).start()
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="prefill worker died"):
        receive_stream(h, 30)
    assert time.monotonic() - t0 < 5


def test_a_missing_layer_is_an_error_not_garbage(server):
    kv = torch.randn(2, 2, 20, 2, 8)
    sender = StreamSender(server)
    sender.begin("r", tuple(kv.shape), "float32", None, lambda n: StreamPlan(["none", "none"], 16))
    sender.add("r", 0, 0, kv[0].clone())  # layer 1 never computed
    sender.end("r")  # the sender notices and fails the transfer
    with pytest.raises(KVTransferError, match="expected"):
        receive_stream(gt_handle(server, kv), 10)


def _options():
    return [CodecOption("none", None, 1.0, 5e9, 5e9, 0), CodecOption("int8", None, 0.5, 1e9, 2e9, 1),
            CodecOption("cachegen", 3, 0.1, 2e8, 1.5e8, 5)]


def test_adaptive_policy_sends_raw_on_a_fast_link_and_compresses_on_a_slow_one():
    pol = TransferPolicy(PolicySpec("adaptive", chunk_tokens=512, budget_s=0.6), _options(), 1e-4)
    pol.controller.links[("a", "fast")] = LinkEstimate(1.25e10, samples=1)
    pol.controller.links[("a", "slow")] = LinkEstimate(1.25e7, samples=1)  # 100 Mbit/s
    per_token = 8 * 1024  # 32 MiB for 4096 tokens: 2.7 s raw on the slow link
    fast = pol.planner("a", "fast", per_token)(4096)
    assert fast.choices == ["none"] * 8 and fast.meets_budget
    slow = pol.planner("a", "slow", per_token)(4096)
    assert slow.meets_budget and any(c.startswith("cachegen") for c in slow.choices)
    assert RECOMPUTE not in slow.choices  # a codec level meets the budget
    # Recompute, if used, is a suffix.
    tight = TransferPolicy(PolicySpec("adaptive", chunk_tokens=512, budget_s=0.05), _options(), 1e-6)
    tight.controller.links[("a", "slow")] = LinkEstimate(1.25e6, samples=1)
    p = tight.planner("a", "slow", per_token)(4096)
    assert RECOMPUTE in p.choices
    k = p.choices.index(RECOMPUTE)
    assert all(c == RECOMPUTE for c in p.choices[k:])


def test_pinned_policy_and_long_prompts_cap_the_chunk_count():
    pol = TransferPolicy(PolicySpec("cachegen", level=2, chunk_tokens=64))
    plan = pol.planner("a", "b", 1024)(64 * 200)
    assert set(plan.choices) == {"cachegen:2"} and len(plan.choices) <= 64


def test_kvtc_chunks_stream_with_their_positions(server):
    """kvtc in a transfer: each chunk is coded with its position (keys before RoPE) by
    the calibration the worker loaded, and the receiver decodes it with no side
    information but that calibration (registered in its process)."""
    import numpy as np

    from kvtransfer.codec import get_codec
    from kvtransfer.codecs import kvtc
    from kvtransfer.codecs.kvtc_calib import calibrate_kv, rope_keys

    inv = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    g = torch.Generator().manual_seed(3)
    pre = 2 * torch.randn(2, 1, 2, 16, generator=g) + 0.1 * torch.randn(2, 64, 2, 16, generator=g)
    kv = torch.stack([rope_keys(pre, 0, inv, 1), torch.randn(2, 64, 2, 16, generator=g)], dim=1)
    cal = kvtc.register(calibrate_kv(kv, inv_freq=inv), current=True)
    try:
        plan = StreamPlan(["kvtc:2", "none", "kvtc:2", "kvtc:5"], 16)
        _send(server, kv, plan)
        got = receive_stream(gt_handle(server, kv), 10)
        assert got.kv_tokens == 64 and got.choices == plan.choices
        assert torch.equal(got.kv[:, :, 16:32], kv[:, :, 16:32])
        for chunk in (0, 2):  # what a codec at that position gives, piece by piece
            a = 16 * chunk
            coders = [get_codec("kvtc", level=2, calibration=cal, first_layer=layer, total_layers=2, first_token=a)
                      for layer in range(2)]
            want = torch.cat([c.decode(c.encode(kv[layer:layer + 1, :, a:a + 16])) for layer, c in enumerate(coders)])
            assert torch.allclose(got.kv[:, :, a:a + 16], want, atol=1e-6)
        err = (got.kv[:, :, 48:] - kv[:, :, 48:]).norm() / kv[:, :, 48:].norm()
        assert 0 < err < 0.1
    finally:
        kvtc._CURRENT.clear()
