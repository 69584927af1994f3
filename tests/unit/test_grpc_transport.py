"""The gRPC KV transport over real sockets on loopback: round trip, corruption, a cut
stream, a dead peer and a missed deadline each end in a clear KVTransferError."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace
import time

import grpc
import pytest

from kvtransfer import grpc_transport as gt
from kvtransfer.connector import KVTransferError


@pytest.fixture
def server():
    s = gt.KVServer("127.0.0.1", 0)
    yield s
    s.stop(0)


def test_round_trip_multi_frame(server):
    data = os.urandom(3 * gt.CHUNK_BYTES + 123)
    server.publish("r1", data)
    assert gt.fetch(server.address, "r1", deadline_s=10) == data
    # Kept until released, so a receiver whose stream failed can fetch again.
    assert gt.fetch(server.address, "r1", deadline_s=10) == data
    gt.release(server.address, "r1")
    with pytest.raises(KVTransferError, match="NOT_FOUND"):  # released
        gt.fetch(server.address, "r1", deadline_s=5)


def test_fail_reaches_a_waiting_receiver_at_once(server):
    server.open("rf")
    server.append("rf", b"x" * 100)
    threading.Timer(0.2, server.fail, args=("rf", "prefill aborted")).start()
    # A receiver that did not learn of the failure would end at its deadline with a
    # "deadline" error instead (no wall-clock bound needed).
    with pytest.raises(KVTransferError, match="prefill aborted"):
        gt.fetch(server.address, "rf", deadline_s=20)


def test_stream_statistics_exclude_waiting_for_parts(server, monkeypatch):
    """The link statistics count the time the stream was sending, not the time it waited
    for the prefill to produce parts. The server's clock jumps 1000 s while it waits (the
    part is produced "1000 s later"), so the result does not depend on this machine's
    speed: busy is what sending took (well under 1000 s), never the wait."""
    offset = [0.0]
    real = time.perf_counter
    monkeypatch.setattr(gt, "time", SimpleNamespace(perf_counter=lambda: real() + offset[0],
                                                    monotonic=time.monotonic, sleep=time.sleep))
    seen = []
    server.on_stream_done = lambda rid, dest, n, busy: seen.append((rid, dest, n, busy))
    server.open("rs", dest="10.0.0.9")

    def produce() -> None:
        offset[0] += 1000.0
        server.append("rs", b"y" * 1000, last=True)

    threading.Timer(0.5, produce).start()
    gt.fetch(server.address, "rs", deadline_s=30)
    (rid, dest, n, busy), = seen
    assert (rid, dest, n) == ("rs", "10.0.0.9", 1000)
    assert 0 <= busy < 500, busy  # with the wait counted it would be >= 1000


def test_parts_stream_as_they_are_appended(server):
    server.open("r2")

    def produce():
        for i in range(4):
            time.sleep(0.05)
            server.append("r2", bytes([i]) * 1000, last=(i == 3))

    threading.Thread(target=produce).start()
    got = list(gt.fetch_parts(server.address, "r2", deadline_s=10))
    assert [p[0] for p in got] == [0, 1, 2, 3]


def test_corrupted_frame_is_detected():
    f = bytearray(gt.frame(0, b"x" * 100, last=True))
    f[-1] ^= 0xFF
    with pytest.raises(KVTransferError, match="checksum"):
        gt.unframe(bytes(f), 0)
    with pytest.raises(KVTransferError, match="out of order"):
        gt.unframe(gt.frame(2, b"x", True), 1)
    with pytest.raises(KVTransferError, match="magic"):
        gt.unframe(b"XXXX" + gt.frame(0, b"x", True)[4:], 0)


def test_deadline_when_sender_stalls(server):
    server.open("r3")
    server.append("r3", b"first part")
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="deadline"):
        gt.fetch(server.address, "r3", deadline_s=0.5)
    # Only a hang guard (the stalled sender never finishes): 60x the deadline, far beyond
    # any noise of this machine.
    assert time.monotonic() - t0 < 30


def test_dead_peer():
    s = gt.KVServer("127.0.0.1", 0)
    addr = s.address
    s.publish("r4", b"x" * 10)
    s.stop(0)
    with pytest.raises(KVTransferError, match="UNAVAILABLE|failed"):
        gt.fetch(addr, "r4", deadline_s=3)


def test_cut_stream(server):
    # A server whose stream ends without the last frame.
    cut = grpc.server(gt.futures.ThreadPoolExecutor(2))

    def fetch(_req, _ctx):
        yield gt.frame(0, b"a" * 10, last=False)

    cut.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "splitserve.KV", {"Fetch": grpc.unary_stream_rpc_method_handler(fetch)}),))
    port = cut.add_insecure_port("127.0.0.1:0")
    cut.start()
    try:
        with pytest.raises(KVTransferError, match="cut after 1 frames"):
            gt.fetch(f"127.0.0.1:{port}", "r5", deadline_s=5)
    finally:
        cut.stop(0)


def test_rate_limit_paces_sender():
    s = gt.KVServer("127.0.0.1", 0, rate_gbps=0.08)  # 10 MB/s
    try:
        s.publish("r6", b"z" * 2_000_000)
        t0 = time.monotonic()
        gt.fetch(s.address, "r6", deadline_s=10)
        assert time.monotonic() - t0 >= 0.15
    finally:
        s.stop(0)


def test_failed_and_released_transfers_hold_nothing(server, monkeypatch):
    """A failed transfer drops its parts at once and its reason after FAILED_KEEP_S; a
    released one is gone; held() counts what is left."""
    server.publish("a", b"x" * 1000)
    server.open("b")
    server.append("b", b"y" * 1000)
    assert server.held() == 2
    server.fail("b", "prefill died")
    assert server.held() == 1 and server._entries["b"].parts == []
    with pytest.raises(KVTransferError, match="prefill died"):
        gt.fetch(server.address, "b", 5)
    gt.release(server.address, "a")
    assert server.held() == 0
    monkeypatch.setattr(gt, "FAILED_KEEP_S", 0.0)
    time.sleep(0.01)
    server.sweep()
    assert "b" not in server._entries


def test_a_server_with_a_token_refuses_other_callers_and_logs_it(caplog):
    s = gt.KVServer("127.0.0.1", 0, token="s3cret")
    try:
        s.publish("req-1", b"prompt KV")
        with caplog.at_level("WARNING", logger="kvtransfer.grpc_transport"):
            for token in ("", "wrong"):  # "" presents none
                with pytest.raises(KVTransferError, match="UNAUTHENTICATED"):
                    gt.fetch(s.address, "req-1", 5, token=token)
            gt.release(s.address, "req-1", token="wrong")  # best effort: refused, logged
        assert s.refused == 3 and s.held() == 1
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 3 and "req-1" in refusals[0] and "no deployment token" in refusals[0]
        assert gt.fetch(s.address, "req-1", 5, token="s3cret") == b"prompt KV"
    finally:
        s.stop(0)


def test_the_process_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(gt.TOKEN_ENV, "from-controller")
    s = gt.KVServer("127.0.0.1", 0)
    try:
        assert s.token == "from-controller"
        s.publish("r", b"kv")
        assert gt.fetch(s.address, "r", 5) == b"kv"  # presents the process's token
        with pytest.raises(KVTransferError, match="UNAUTHENTICATED"):
            gt.fetch(s.address, "r", 5, token="other")
    finally:
        s.stop(0)


def test_tls_server_serves_verified_clients_only(tmp_path):
    """Optional TLS: a client that trusts the deployment's certificate fetches (with the
    token); a plaintext client, or one trusting another certificate, gets nothing."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")

    def make(name):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.pem"),
                        "-subj", f"/CN={gt.TLS_NAME}", "-addext", f"subjectAltName=DNS:{gt.TLS_NAME}"],
                       check=True, capture_output=True, timeout=60)
        return (tmp_path / f"{name}.pem").read_bytes(), (tmp_path / f"{name}.key").read_bytes()

    cert, key = make("deploy")
    other, _ = make("other")
    s = gt.KVServer("127.0.0.1", 0, token="t", tls=(cert, key))
    try:
        assert s.tls
        s.publish("r", b"kv over tls")
        assert gt.fetch(s.address, "r", 10, token="t", cert=cert) == b"kv over tls"
        with pytest.raises(KVTransferError, match="UNAUTHENTICATED"):
            gt.fetch(s.address, "r", 10, token="x", cert=cert)
        with pytest.raises(KVTransferError):  # plaintext to a TLS server
            gt.fetch(s.address, "r", 5, token="t")
        with pytest.raises(KVTransferError):  # the server's certificate is not trusted
            gt.fetch(s.address, "r", 5, token="t", cert=other)
    finally:
        s.stop(0)
