"""gRPC streaming transport for KV bytes between nodes.

Sender side (prefill worker): a ``KVServer`` keeps each request's encoded KV as a list of
parts, appended as they are produced (whole, or layer by layer), and serves them on the
server-streaming method ``/splitserve.KV/Fetch``. Receiver side (decode worker):
``fetch(address, request_id, deadline_s)`` pulls the parts.

The wire is raw bytes (no protobuf): each message is a frame
``magic(4) | seq(u32) | flags(u32) | crc32(u32) | length(u32) | payload``; ``flags & 1``
marks the last frame. The receiver checks magic, sequence, length and CRC of every frame
and that the last one arrived, so a corrupted chunk, a cut stream, a dead peer or a
missed deadline is a ``KVTransferError`` naming what happened, never silent garbage.
HTTP/2 flow control bounds what is in flight; ``rate_gbps`` paces the sender to emulate
a slower link (benchmarks): one pacer per server, so concurrent streams share the link.

A request's parts stay on the sender until the receiver releases them (``/splitserve.KV/
Release``, after it has decoded everything) or they expire, so a receiver whose stream
failed (bad checksum, cut) can fetch again once. ``fail`` ends a transfer that will never
complete (the prefill failed): a waiting receiver gets the reason at once.

Authentication: a deployment has a secret token (the controller generates it at start and
hands it to every worker it creates, in the environment variable ``SPLITSERVE_KV_TOKEN``).
A server with a token answers Fetch and Release only to callers presenting it (metadata
``x-splitserve-kv-token``, compared in constant time); any other call is refused with
UNAUTHENTICATED and logged with the peer's address. Clients present their process's token.

TLS (optional): with ``SPLITSERVE_KV_TLS_CERT`` and ``SPLITSERVE_KV_TLS_KEY`` (PEM files;
the manifest's ``kv_transfer.tls_cert_file`` / ``tls_key_file``, handed to the workers by the
controller) servers listen with TLS only and clients verify the peer against that
certificate, expected to name ``TLS_NAME`` (one certificate per deployment).
"""

from __future__ import annotations

import hmac
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from kvtransfer.base import KV_TOKEN_ENV, KVTransferError

logger = logging.getLogger(__name__)

METHOD = "/splitserve.KV/Fetch"
RELEASE = "/splitserve.KV/Release"
MAGIC = b"SSKV"
_HEADER = struct.Struct("<4sIIII")
FLAG_LAST = 1
CHUNK_BYTES = 1 << 20
# Parts not released within this time are dropped (the decode side gave up or died).
EXPIRE_S = 120.0
TOKEN_ENV = KV_TOKEN_ENV
TOKEN_HEADER = "x-splitserve-kv-token"


def process_token() -> str | None:
    """This process's deployment token (None: KV servers here accept anyone; tests, tools)."""
    return os.environ.get(TOKEN_ENV) or None


def _auth(token: str | None) -> tuple[tuple[str, str], ...] | None:
    token = token if token is not None else process_token()
    return ((TOKEN_HEADER, token),) if token else None


TLS_CERT_ENV = "SPLITSERVE_KV_TLS_CERT"
TLS_KEY_ENV = "SPLITSERVE_KV_TLS_KEY"
# The name the deployment's certificate carries (subjectAltName DNS); clients check it.
TLS_NAME = "splitserve-kv"


def process_tls() -> tuple[bytes, bytes] | None:
    """(certificate, key) PEM of this process's deployment, or None (plaintext)."""
    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    if not cert or not key:
        return None
    with open(cert, "rb") as c, open(key, "rb") as k:
        return c.read(), k.read()


# A failed transfer keeps only its reason (for a receiver still to ask), this long.
FAILED_KEEP_S = 10.0


def frame(seq: int, payload: bytes, last: bool) -> bytes:
    return _HEADER.pack(MAGIC, seq, FLAG_LAST if last else 0, zlib.crc32(payload), len(payload)) + payload


def unframe(msg: bytes, expect_seq: int) -> tuple[bytes, bool]:
    if len(msg) < _HEADER.size:
        raise KVTransferError(f"KV frame {expect_seq} is {len(msg)} bytes, shorter than its header")
    magic, seq, flags, crc, length = _HEADER.unpack_from(msg)
    if magic != MAGIC:
        raise KVTransferError(f"KV frame {expect_seq} has bad magic {magic!r}")
    if seq != expect_seq:
        raise KVTransferError(f"KV frame out of order: got {seq}, expected {expect_seq}")
    payload = msg[_HEADER.size:]
    if len(payload) != length:
        raise KVTransferError(f"KV frame {seq} carries {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload) != crc:
        raise KVTransferError(f"KV frame {seq} failed its checksum (corrupted in transit)")
    return payload, bool(flags & FLAG_LAST)


@dataclass
class _Entry:
    parts: list[bytes] = field(default_factory=list)
    closed: bool = False
    # Why the transfer will never complete (the sender failed), or None.
    error: str | None = None
    # Receiver's node (link statistics are kept per destination).
    dest: str | None = None
    created: float = field(default_factory=time.monotonic)
    failed_at: float | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)


class KVServer:
    """Serves published KV parts to decode workers. One per sender process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, rate_gbps: float | None = None,
                 max_workers: int = 8, token: str | None = None,
                 tls: tuple[bytes, bytes] | None = None) -> None:
        # Callers must present this token (default: the process's deployment token).
        self.token = token if token is not None else process_token()
        self.refused = 0  # calls refused for a missing or wrong token
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.rate_gbps = rate_gbps
        self.bytes_sent = 0
        self._pace_lock = threading.Lock()
        self._pace_next = 0.0
        # Called (request id, dest, bytes, seconds the stream was sending, not waiting for
        # parts) when a stream has sent its last frame: the link throughput sample.
        self.on_stream_done: "Callable[[str, str | None, int, float], None] | None" = None
        # Fault injection for tests and drills: ("corrupt" | "cut", fetches left).
        self.fault: tuple[str, int] | None = None
        handler = grpc.method_handlers_generic_handler("splitserve.KV", {
            "Fetch": grpc.unary_stream_rpc_method_handler(self._fetch),
            "Release": grpc.unary_unary_rpc_method_handler(self._release),
        })
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                   options=[("grpc.max_send_message_length", 2 * CHUNK_BYTES),
                                            ("grpc.max_receive_message_length", 2 * CHUNK_BYTES)])
        self._server.add_generic_rpc_handlers((handler,))
        tls = tls if tls is not None else process_tls()
        self.tls = tls is not None
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(f"{host}:{port}", creds)
        else:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise KVTransferError(f"could not bind the KV server to {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._server.start()

    # -- sender API -------------------------------------------------------------------
    def open(self, request_id: str, dest: str | None = None) -> None:
        with self._lock:
            self._expire()
            self._entries[request_id] = _Entry(dest=dest)

    def fail(self, request_id: str, reason: str) -> None:
        """The transfer will never complete: receivers get ``reason`` instead of waiting."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        with entry.cond:
            entry.error = reason
            entry.closed = True
            entry.parts = []  # nobody can use them: free the bytes now
            entry.failed_at = time.monotonic()
            entry.cond.notify_all()

    def append(self, request_id: str, data: bytes, last: bool = False) -> None:
        """Publish the next part of a request's KV (split into frames of CHUNK_BYTES)."""
        entry = self._entries.get(request_id)
        if entry is None:
            raise KVTransferError(f"no open KV transfer for {request_id}")
        with entry.cond:
            for i in range(0, max(len(data), 1), CHUNK_BYTES):
                entry.parts.append(data[i:i + CHUNK_BYTES])
            entry.closed = last
            entry.cond.notify_all()

    def publish(self, request_id: str, data: bytes) -> None:
        self.open(request_id)
        self.append(request_id, data, last=True)

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for rid, e in list(self._entries.items()):
            if e.failed_at is not None and now - e.failed_at > FAILED_KEEP_S:
                del self._entries[rid]
            elif now - e.created > EXPIRE_S:
                logger.warning("dropping unfetched KV of %s", rid)
                del self._entries[rid]

    def sweep(self) -> None:
        """Drop expired transfers (the owner calls it periodically, e.g. from health())."""
        with self._lock:
            self._expire()

    def held(self) -> int:
        """Transfers whose parts this server still holds (failed ones hold none)."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.failed_at is None)

    # -- the RPC ----------------------------------------------------------------------
    def _check(self, what: str, request_id: str, context: grpc.ServicerContext) -> None:
        if not self.token:
            return
        got = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
        if not hmac.compare_digest(str(got).encode(), self.token.encode()):
            self.refused += 1
            logger.warning("refused %s of KV %r from %s: %s deployment token", what, request_id[:80],
                           context.peer(), "wrong" if got else "no")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this KV server wants the deployment's token")

    def _release(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._check("release", request.decode(errors="replace"), context)
        self.discard(request.decode())
        return b""

    def _pace(self, nbytes: int) -> None:
        """Shared token bucket: this frame leaves when the emulated link is free."""
        if not self.rate_gbps:
            return
        with self._pace_lock:
            now = time.perf_counter()
            start = max(now, self._pace_next)
            self._pace_next = start + nbytes * 8 / (self.rate_gbps * 1e9)
            wait = self._pace_next - now
        if wait > 0:
            time.sleep(wait)

    def _fetch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        rid = request.decode(errors="replace")
        self._check("fetch", rid, context)
        entry = self._entries.get(rid)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no KV for {rid} on this worker")
        seq = 0
        t_start = time.perf_counter()
        waited = 0.0
        sent = 0
        while True:
            with entry.cond:
                while seq >= len(entry.parts) and not entry.closed:
                    remaining = context.time_remaining()
                    if remaining is not None and remaining <= 0:
                        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"KV of {rid} was not produced before the deadline")
                    t_wait = time.perf_counter()
                    entry.cond.wait(timeout=min(1.0, remaining or 1.0))
                    waited += time.perf_counter() - t_wait
                    if not context.is_active():
                        return
                if entry.error is not None:
                    context.abort(grpc.StatusCode.ABORTED, f"sender failed: {entry.error}")
                part = entry.parts[seq]
                last = entry.closed and seq == len(entry.parts) - 1
            self._pace(len(part))
            sent += len(part)
            self.bytes_sent += len(part)
            fault = self._take_fault(seq)
            if fault == "cut":
                context.abort(grpc.StatusCode.ABORTED, "stream cut (injected fault)")
            msg = frame(seq, part, last)
            if fault == "corrupt":
                msg = msg[:-1] + bytes([msg[-1] ^ 0xFF])
            if last and self.on_stream_done is not None:
                # Before the last yield: the receiver may close the call once it has it.
                busy = time.perf_counter() - t_start - waited
                try:
                    self.on_stream_done(rid, entry.dest, sent, busy)
                except Exception:  # noqa: BLE001 - statistics never fail a transfer
                    logger.exception("on_stream_done failed")
            yield msg
            seq += 1
            if last:
                return

    def _take_fault(self, seq: int) -> str | None:
        if self.fault is None or seq != 0:
            return None
        kind, left = self.fault
        self.fault = (kind, left - 1) if left > 1 else None
        return kind

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s)


_channels: dict[tuple[str, bytes | None], grpc.Channel] = {}
_channels_lock = threading.Lock()


def _channel(address: str, cert: bytes | None = None) -> grpc.Channel:
    """A cached channel to a KV server: TLS verified against cert (default: the process's
    deployment certificate), else plaintext."""
    if cert is None:
        tls = process_tls()
        cert = tls[0] if tls is not None else None
    with _channels_lock:
        key = (address, cert)
        ch = _channels.get(key)
        if ch is None:
            options = [("grpc.max_receive_message_length", 2 * CHUNK_BYTES),
                       ("grpc.max_send_message_length", 2 * CHUNK_BYTES)]
            if cert is not None:
                ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=cert),
                                         options=options + [("grpc.ssl_target_name_override", TLS_NAME)])
            else:
                ch = grpc.insecure_channel(address, options=options)
            _channels[key] = ch
        return ch


def fetch_parts(address: str, request_id: str, deadline_s: float,
                token: str | None = None, cert: bytes | None = None) -> Iterator[bytes]:
    """Yield the payload of each frame of a request's KV, verified, in order. token:
    presented to the sender, cert: the sender's TLS certificate (defaults: the process's
    deployment token and certificate)."""
    call = _channel(address, cert).unary_stream(METHOD)(request_id.encode(), timeout=deadline_s,
                                                  metadata=_auth(token))
    seq = 0
    try:
        for msg in call:
            payload, last = unframe(msg, seq)
            yield payload
            seq += 1
            if last:
                return
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise KVTransferError(f"KV of {request_id} from {address} missed its {deadline_s}s "
                                  f"deadline after {seq} frames") from None
        raise KVTransferError(f"KV stream of {request_id} from {address} failed after {seq} "
                              f"frames: {code.name}: {e.details()}") from None
    finally:
        call.cancel()
    raise KVTransferError(f"KV stream of {request_id} from {address} was cut after {seq} frames "
                          "(no last frame)")


def release(address: str, request_id: str, timeout_s: float = 5.0, token: str | None = None) -> None:
    """Tell the sender it may drop the request's parts (best effort: they expire anyway)."""
    try:
        _channel(address).unary_unary(RELEASE)(request_id.encode(), timeout=timeout_s,
                                               metadata=_auth(token))
    except grpc.RpcError as e:
        logger.debug("release of %s at %s failed: %s", request_id, address, e.code())


def fetch(address: str, request_id: str, deadline_s: float, token: str | None = None,
          cert: bytes | None = None) -> bytes:
    return b"".join(fetch_parts(address, request_id, deadline_s, token, cert))
