"""The same-node KV arena (kvtransfer/shm.py): bit-exact round trips, mode 0600 and no
file left behind, fallback when full, no stale or reused slot ever read (lockf across
processes), checksums, a dead owner's arena; and admission into reserved blocks off the
engine thread (decode_workers/admission.py, LLMEngine.reserve): same greedy tokens, and a
cancelled admission gives its blocks back only after its writer stopped."""

from __future__ import annotations

import asyncio
import os
import pickle
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from kvtransfer import shm, shm_layout
from kvtransfer.base import KVTransferError
from kvtransfer.connector import get_connector

ROOT = Path(__file__).resolve().parents[2]


def our_files() -> list[str]:
    return [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"{shm.FILE_PREFIX}{os.getpid()}-")]


@pytest.fixture
def arena():
    a = shm.ShmArena(4 << 20, ttl_s=60)
    yield a
    a.close()


def _no_kernels(monkeypatch):
    """As where numba is not installed: engine.kvcopy's kernels unavailable."""
    from engine import kvcopy

    monkeypatch.setattr(kvcopy, "_kernels", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(arena, dtype, monkeypatch):
    monkeypatch.setattr(shm_layout, "PIECE_BYTES", 4096)  # several pieces per layer, uneven last ones
    _no_kernels(monkeypatch)
    kv = torch.randn(3, 2, 1000, 2, 16).to(dtype)
    h = arena.put("r", kv)
    assert h is not None and h.transport == "shm" and h.nbytes == kv.numel() * kv.element_size()
    assert len(h.ref.sums) > 3 * 2  # several checksummed pieces per layer
    got = shm.read(h, timeout_s=5)
    assert got.dtype == dtype and torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                              kv.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # The reader marked it done: the next sweep frees it.
    assert arena.held() == 0 and arena.free_bytes() == arena.size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sender,reader", [("fused", "fused"), ("fused", "plain"), ("plain", "fused")])
def test_fused_checksums_round_trip_either_way(arena, dtype, sender, reader, monkeypatch):
    """With numba (engine.kvcopy) the sum of each (layer, K/V) row is taken in the copy's own
    loop; a reader with or without the kernels checks the same sums, bit-exact."""
    from engine import kvcopy

    if not kvcopy.available():
        pytest.skip("numba is not installed here")
    monkeypatch.setattr(shm_layout, "PIECE_BYTES", 4096)
    kv = torch.randn(3, 2, 1000, 2, 16).to(dtype)
    with monkeypatch.context() as m:
        if sender == "plain":
            _no_kernels(m)
        h = arena.put("r", kv)
    assert len(h.ref.sums) == (3 * 2 if sender == "fused" else len(shm.pieces(kv.shape, h.ref.piece_tokens)))
    with monkeypatch.context() as m:
        if reader == "plain":
            _no_kernels(m)
        got = shm.read(h, timeout_s=5)
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
    # The sums are checksum()'s of the same pieces.
    spans = shm.pieces(kv.shape, h.ref.piece_tokens)
    assert h.ref.sums == [shm.checksum(kv[layer, j, a:b].contiguous()) for layer, j, a, b in spans]


def test_file_is_private_and_never_left_behind(arena):
    st = os.stat(f"/proc/self/fd/{arena.fd}")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert our_files() == []  # unlinked at creation: nothing to clean up after a crash


def test_full_arena_falls_back_to_the_object_store(arena):
    conn = get_connector("auto", "127.0.0.1", arena=arena)
    big = torch.zeros(1, 2, 40_000, 2, 16)  # 10 MiB > 4 MiB
    assert arena.put("big", big) is None and arena.full == 1
    small = torch.randn(2, 2, 64, 2, 16)
    h = conn.shm.send("small", small)
    assert h is not None
    # Fill the arena, then the pair connector's next same-node send must fall back.
    held = [arena.put(f"f{i}", torch.zeros(1, 2, 7000, 2, 16)) for i in range(3)]
    assert held[-1] is None or arena.put("f-more", torch.zeros(1, 2, 7000, 2, 16)) is None
    assert conn.pick("127.0.0.1") is conn.shm
    assert conn.pick("127.0.0.9") is conn.grpc
    before = conn.shm.fallbacks
    try:
        import ray  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip("ray not installed")
    # send() tries the arena first; the object store needs Ray, so check the decision only.
    assert conn.shm.send("x", torch.zeros(1, 2, 7000, 2, 16)) is None and conn.shm.fallbacks == before + 1
    for i in range(3):
        arena.release(f"f{i}")
    arena.release("f-more")
    assert conn.shm.send("y", torch.zeros(1, 2, 7000, 2, 16)) is not None


def test_released_slot_is_never_read(arena):
    kv = torch.randn(2, 2, 64, 2, 16)
    h = arena.put("r", kv)
    arena.release("r")
    h2 = arena.put("other", torch.randn(2, 2, 64, 2, 16))  # reuses the same bytes
    assert h2 is not None and h2.ref.offset == h.ref.offset
    with pytest.raises(KVTransferError, match="freed before it was read"):
        shm.read(h, timeout_s=2)
    assert shm.read(h2, timeout_s=2).shape == kv.shape  # the new owner's KV is intact


@pytest.mark.parametrize("kernels", [True, False])
def test_corrupted_slot_fails_its_checksum(arena, kernels, monkeypatch):
    from engine.runner import ModelRunner

    if not kernels:
        _no_kernels(monkeypatch)
    kv = torch.randn(2, 2, 300, 2, 16)
    h = arena.put("r", kv)
    pos = h.ref.offset + shm.HEADER_BYTES + h.nbytes // 2
    arena.mm[pos] = arena.mm[pos] ^ 0x40
    with pytest.raises(KVTransferError, match="checksum"):
        shm.read(h, timeout_s=2)
    # And scattered into a paged cache, the sum taken in the scatter's loop.
    h = arena.put("r2", kv)
    arena.mm[h.ref.offset + shm.HEADER_BYTES + 8] ^= 0x01
    runner = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 40, 16, 2, 16) for _ in range(2)], 16)
    table = list(range(39, 19, -1))
    with pytest.raises(KVTransferError, match="layer 0 K .*checksum"):
        shm.read_into(h, lambda layer, j, first, x: runner.write_kv(table, layer, first, x, j, checksum=True), 2)


_READER = r"""
import pickle, sys, threading
sys.path.insert(0, sys.argv[1])
from kvtransfer import shm
h = pickle.loads(bytes.fromhex(sys.stdin.readline()))
seen = []
def write(layer, j, first, kv):
    if not seen:
        print("reading", flush=True)
        sys.stdin.readline()  # hold the slot until told
    seen.append(kv.clone())
shm.read_into(h, write, 10)
print("done", len(seen), flush=True)
"""


def test_slot_is_not_freed_while_another_process_reads_it(arena):
    kv = torch.randn(2, 2, 64, 2, 16)
    h = arena.put("r", kv)
    p = subprocess.Popen([sys.executable, "-c", _READER, str(ROOT)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        p.stdin.write(pickle.dumps(h).hex() + "\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "reading"
        arena.release("r")  # the request ended, but a reader is inside: the slot stays
        assert arena.held() == 1
        assert [s["locked_by"] for s in arena.slots()] == [p.pid]  # who holds it, for diagnosis
        other = arena.put("other", torch.zeros_like(kv))
        assert other is not None and other.ref.offset != h.ref.offset  # not on the reader's bytes
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["done", str(len(h.ref.sums))]
    finally:
        p.kill()
        p.wait(timeout=10)
    arena.release("other")
    assert arena.held() == 0  # the finished reader let the sweep free it


def test_release_before_put_publishes_nothing(arena):
    """The request ended (the ingress released its KV) before the prefill worker's sender
    thread published it: the late put holds no slot (it used to hold one until the TTL)."""
    kv = torch.randn(2, 2, 64, 2, 16)
    arena.release("r")
    with pytest.raises(KVTransferError, match="released before it was published"):
        arena.put("r", kv)
    assert arena.buffer("r", tuple(kv.shape), kv.dtype) is None  # no reservation either
    assert arena.held() == 0 and arena.free_bytes() == arena.size
    assert arena.put("r2", kv) is not None  # other requests are unaffected


def test_release_while_the_sender_writes_defers_to_the_writer(arena):
    """A release between the engine's gather into a slot and its publication: the slot is
    not freed under the writer (its bytes are not given to another request meanwhile),
    then the put frees it instead of publishing it."""
    kv = torch.randn(2, 2, 64, 2, 16)
    buf = arena.buffer("r", tuple(kv.shape), kv.dtype)
    assert buf is not None
    buf.copy_(kv)  # the engine's export
    arena.release("r")
    assert arena.held() == 1  # still the writer's
    other = arena.put("other", torch.randn(2, 2, 64, 2, 16))
    assert other is not None
    slot_r = next(s for s in arena.slots() if s["request_id"] == "r")
    assert slot_r["writing"] and slot_r["released"]
    assert other.ref.offset + shm.HEADER_BYTES != buf.data_ptr() - arena._buf.data_ptr()
    with pytest.raises(KVTransferError, match="released"):
        arena.put("r", buf)
    arena.release("other")
    assert arena.held() == 0 and arena.free_bytes() == arena.size


def test_discarded_reservation_is_given_back(arena):
    kv = torch.randn(2, 2, 64, 2, 16)
    assert arena.buffer("r", tuple(kv.shape), kv.dtype) is not None
    arena.discard("r")  # the prefill attempt ended without a put
    assert arena.held() == 0 and arena.free_bytes() == arena.size
    h = arena.put("r", kv)  # a retried prefill of the same request still publishes
    assert h is not None
    arena.discard("r", generation=h.ref.generation ^ 2)  # another transfer's: not this one
    assert arena.held() == 1
    arena.discard("r", generation=h.ref.generation)
    assert arena.held() == 0


def test_reservation_expires_at_its_ttl():
    a = shm.ShmArena(1 << 20, ttl_s=0.2)
    try:
        assert a.buffer("r", (1, 2, 8, 2, 4), torch.float32) is not None
        assert a.held() == 1
        import time

        time.sleep(0.3)
        assert a.held() == 0  # a reservation whose put never came
    finally:
        a.close()


def test_reader_past_its_deadline_lets_go(arena, monkeypatch):
    monkeypatch.setattr(shm_layout, "PIECE_BYTES", 4096)
    kv = torch.randn(3, 2, 200, 2, 16)
    h = arena.put("r", kv)
    import time

    def slow(layer, j, first, piece):
        time.sleep(0.2)

    with pytest.raises(KVTransferError, match="deadline"):
        shm.read_into(h, slow, timeout_s=0.3)
    assert arena.slots()[0]["state"] == "ready"  # not marked done: it was not read
    arena.release("r")
    assert arena.held() == 0


_OWNER = r"""
import pickle, sys, torch
sys.path.insert(0, sys.argv[1])
from kvtransfer import shm
a = shm.ShmArena(1 << 20)
h = a.put("r", torch.arange(2 * 2 * 8 * 2 * 4, dtype=torch.float32).view(2, 2, 8, 2, 4))
print(pickle.dumps(h).hex(), flush=True)
sys.stdin.readline()
"""


def test_dead_owner_arena_is_gone():
    p = subprocess.Popen([sys.executable, "-c", _OWNER, str(ROOT)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        h = pickle.loads(bytes.fromhex(p.stdout.readline()))
        assert torch.equal(shm.read(h, 5).flatten(), torch.arange(256, dtype=torch.float32))
        assert shm.detach_dead() >= 1  # attached while the owner lives
    finally:
        p.kill()
        p.wait(timeout=10)
    assert not [f for f in os.listdir(shm.SHM_DIR) if f.startswith(f"{shm.FILE_PREFIX}{p.pid}-")]
    shm.detach_dead()
    assert (h.ref.pid, h.ref.dev, h.ref.ino) not in shm._attached  # its memory is returned
    with pytest.raises(KVTransferError, match="gone"):
        shm.read(h, 2)


# -- admission into reserved blocks ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir():
    from models.builtin import builtin_model_dir

    return builtin_model_dir("tiny-llama")


def _engine(model_dir):
    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig

    return LLMEngine.from_model_dir(model_dir, num_blocks=64, block_size=8,
                                    scheduler_config=SchedulerConfig(max_num_batched_tokens=64, max_model_len=512))


def _run(engine, max_steps=500):
    outs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return outs
        for s in engine.step().finished:
            outs[s.request_id] = s.output_token_ids
    raise AssertionError("did not finish")


@pytest.mark.parametrize("kernels", [True, False])
def test_reserved_admission_matches_the_engine_alone(tiny_dir, arena, kernels, monkeypatch):
    from decode_workers.admission import receive_and_admit
    from engine import kvcopy

    if not kernels:
        _no_kernels(monkeypatch)
    from engine.sequence import SamplingParams

    params = {"temperature": 0, "max_tokens": 10, "ignore_eos": True}
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 19, 33)]
    alone = _engine(tiny_dir).generate(prompts, SamplingParams(**params))

    # The prompt KV and first token as a prefill worker makes them: a prefill-only engine
    # exports each prompt's KV when it samples.
    prefill = _engine(tiny_dir)
    prefill.scheduler.config.prefill_only = True
    prefill.runner.export_into = arena.buffer  # gathered straight into arena slots
    prefill.runner.export_sums = arena.set_sums  # with the checksums summed in the gather
    firsts, kvs = [], []
    for i, p in enumerate(prompts):
        prefill.add_request(f"p{i}", p, SamplingParams(**params))
        out = prefill.step()
        firsts.append(out.new_tokens[f"p{i}"])
        kvs.append(out.exported_kv[f"p{i}"])
        assert 0 <= kvs[i].data_ptr() - arena._buf.data_ptr() < arena.size
    decode = _engine(tiny_dir)
    conn = get_connector("auto", "127.0.0.1", arena=arena)

    async def admit_all():
        for i, p in enumerate(prompts):
            h = conn.send(f"p{i}", kvs[i])  # published where it was gathered: no copy
            assert h.transport == "shm" and h.ref.offset + shm.HEADER_BYTES == kvs[i].data_ptr() - arena._buf.data_ptr()
            if kvcopy.available():  # one sum per (layer, K/V), from the gather
                assert len(h.ref.sums) == 2 * kvs[i].shape[0] and h.ref.piece_tokens == len(p)
            item = {"prompt_token_ids": p, "params": params, "output_token_ids": [firsts[i]]}
            got = await receive_and_admit(decode, conn, f"d{i}", item, h, 5, can_reserve=True)
            assert item.get("reserved") is True and got.kv_tokens == len(p)
            decode.add_request(f"d{i}", p, SamplingParams(**params), output_token_ids=[firsts[i]], reserved=True)

    asyncio.run(admit_all())
    outs = _run(decode)
    assert [outs[f"d{i}"] for i in range(len(prompts))] == alone
    assert decode.bm.num_used_blocks == 0 and arena.held() == 0


def test_cancelled_admission_frees_blocks_only_after_its_writer(tiny_dir, arena):
    from decode_workers.admission import receive_and_admit

    decode = _engine(tiny_dir)
    conn = get_connector("auto", "127.0.0.1", arena=arena)
    kv = torch.randn(4, 2, 40, 2, 16)
    h = conn.send("r", kv)
    entered, go = threading.Event(), threading.Event()
    real = decode.runner.write_kv

    def slow_write(*a, **kw):
        entered.set()
        assert go.wait(10)
        real(*a, **kw)

    decode.runner.write_kv = slow_write
    params = {"temperature": 0, "max_tokens": 4}

    async def scenario():
        item = {"prompt_token_ids": list(range(3, 43)), "params": params, "output_token_ids": [5]}
        task = asyncio.ensure_future(receive_and_admit(decode, conn, "r", item, h, 5, can_reserve=True))
        await asyncio.to_thread(entered.wait, 10)
        used = decode.bm.num_used_blocks
        assert used == 6  # 41 tokens in blocks of 8
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert decode.bm.num_used_blocks == used  # the writer still writes into them
        go.set()
        for _ in range(200):
            if decode.bm.num_used_blocks == 0:
                break
            await asyncio.sleep(0.02)
        assert decode.bm.num_used_blocks == 0

    asyncio.run(scenario())
    arena.release("r")
    assert arena.held() == 0
