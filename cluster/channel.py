"""One long-lived TCP channel per (worker, ingress): requests in, batched events out.

Ray calls cost ~1 ms a round trip here and a Ray object per streamed item (issue 17); a
framed socket costs ~0.05 ms (benchmarks/results/2026-12-06-path). Each worker listens on
its node's address; an ingress connects once per worker and authenticates with the
worker's random token, which it learned through an (authenticated) Ray call
(``channel_info``). Nothing is unpickled before the token matched.

Frames are a 4-byte length and a pickled list of messages. Messages queued by the worker
in one event-loop turn (one engine step's tokens for every request of that ingress) leave
as one frame. Backpressure: while the socket's send buffer is over ``HIGH_WATER`` the
worker stops writing and coalesces further messages into the next frame (the engine never
waits); a peer that reads nothing for ``STALL_S`` is disconnected. A closed channel fails
every request on it on both sides: the worker aborts them, the ingress resumes them
elsewhere.

The worker's end is here (Conn, ChannelServer), the ingress's in cluster.channel_client.
Neither knows Ray, the engine or HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pickle
import secrets
import struct
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
TOKEN_BYTES = 32
MAX_FRAME = 256 << 20
HIGH_WATER = 4 << 20
STALL_S = 30.0
CONNECT_TIMEOUT_S = 5.0


class ChannelClosedError(ConnectionError):
    """The channel to a worker closed (the worker died, or the link did)."""


def _frame(msgs: list[dict[str, Any]]) -> bytes:
    try:
        body = pickle.dumps(msgs, protocol=5)
    except Exception:  # noqa: BLE001 - an unpicklable error object: send its text instead
        msgs = [{**m, "error": RuntimeError(repr(m["error"]))} if "error" in m else m for m in msgs]
        body = pickle.dumps(msgs, protocol=5)
    return _LEN.pack(len(body)) + body


class Conn:
    """The worker's end of one ingress's channel."""

    def __init__(self, client_id: str, writer: _Framed) -> None:
        self.client_id = client_id
        self.writer = writer
        self.closed = False
        self.ended = False
        self.frames = 0
        self.messages = 0
        self._buf: list[dict[str, Any]] = []
        self._scheduled = False
        self._draining = False

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a message; everything queued in this event-loop turn leaves as one frame."""
        if self.closed:
            return
        self._buf.append(msg)
        if not self._scheduled and not self._draining:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Write what is queued now instead of at the end of this event-loop turn (a reply
        that should leave before other work of this turn starts)."""
        self._flush()

    def hand_off(self) -> None:
        """flush(), then give this CPU to the reader (yield_cpu): for a reply the peer waits
        for, when this turn has more work after it."""
        self._flush()
        yield_cpu()

    def _flush(self) -> None:
        self._scheduled = False
        if self.closed or not self._buf or self._draining:
            return
        msgs, self._buf = self._buf, []
        self.frames += 1
        self.messages += len(msgs)
        self.writer.write(_frame(msgs))
        if self.writer.transport.get_write_buffer_size() > HIGH_WATER:
            self._draining = True
            asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), timeout=STALL_S)
        except Exception as e:  # noqa: BLE001 - a peer that does not read is cut off
            logger.warning("channel to %s stalled or failed (%s); closing it", self.client_id, e)
            self.close()
            return
        self._draining = False
        self._flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class ChannelServer:
    """The worker's listener. on_message(conn, msg) handles each request; on_close(conn)
    runs once when a channel ends."""

    def __init__(self, on_message: Callable[[Conn, dict[str, Any]], None],
                 on_close: Callable[[Conn], None]) -> None:
        self.on_message = on_message
        self.on_close = on_close
        self.token = secrets.token_hex(TOKEN_BYTES // 2).encode()
        self.conns: dict[str, Conn] = {}
        self.host = ""
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str) -> None:
        self._server = await asyncio.get_running_loop().create_server(self._accepted, host, 0)
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])

    def info(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "token": self.token.decode()}

    def stats(self) -> dict[str, int]:
        return {"channel_clients": len(self.conns),
                "channel_frames": sum(c.frames for c in self.conns.values()) + self._closed_frames,
                "channel_messages": sum(c.messages for c in self.conns.values()) + self._closed_messages}

    _closed_frames = 0
    _closed_messages = 0

    def _accepted(self) -> _ServerEnd:
        return _ServerEnd(self)

    def _ended(self, conn: Conn) -> None:
        """Once per channel: replaced by a new one of its ingress, or its connection lost."""
        if conn.ended:
            return
        conn.ended = True
        self._closed_frames += conn.frames
        self._closed_messages += conn.messages
        conn.close()
        self.on_close(conn)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns.values()):
            conn.close()


def yield_cpu() -> None:
    """Let the process this one just woke run first. A socket write wakes its reader with
    a "sync" wake-up: Linux places the reader on the writer's CPU, expecting the writer to
    sleep soon; if the writer's event-loop turn goes on instead, the reader waits for it
    (on this 2-core machine ~0.1 ms of a prefill reply's way back: the KV publish
    hand-off after the reply; benchmarks/results/2026-12-06-path, session 11). Without a
    runnable thread waiting here this returns at once."""
    try:
        os.sched_yield()
    except (AttributeError, OSError):  # not on every platform
        pass


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Framed(asyncio.Protocol):
    """One end of a channel as a protocol: frames are parsed as their bytes arrive and
    handed to on_frame in that same event-loop turn (a reader task on a StreamReader took
    one more turn per frame: on each request's way in and its reply's way back, and per
    token frame of every stream). Flow control as StreamWriter.drain."""

    def __init__(self, on_frame: Callable[[list[dict[str, Any]]], None],
                 on_lost: Callable[[BaseException | None], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._paused = False
        self._drained: list[asyncio.Future[None]] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        self._frames()

    def _frames(self) -> None:
        buf = self._buf
        while len(buf) >= _LEN.size and not self.lost:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_FRAME:
                logger.warning("channel frame of %d bytes exceeds %d; closing the channel", n, MAX_FRAME)
                self.close()
                return
            end = _LEN.size + n
            if len(buf) < end:
                return
            body = bytes(buf[_LEN.size:end])
            del buf[:end]
            self.on_frame(pickle.loads(body))  # noqa: S301 - authenticated peer

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.resume_writing()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiters, self._drained = self._drained, []
        for w in waiters:
            _wake(w)

    async def drain(self) -> None:
        if self._paused and not self.lost:
            w = asyncio.get_running_loop().create_future()
            self._drained.append(w)
            await w

    # What Conn uses of a StreamWriter.
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _ServerEnd(_Framed):
    """A worker's end of one connection: the handshake (the token, then the client id)
    within CONNECT_TIMEOUT_S, then frames, each message to the server's on_message in the
    event-loop turn its bytes arrive in. Nothing is unpickled before the token matched."""

    def __init__(self, server: ChannelServer) -> None:
        super().__init__(self._messages, self._lost)
        self.server = server
        self.conn: Conn | None = None
        self._timer = asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, self.close)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.conn is None and not self._handshake():
            return
        self._frames()

    def _handshake(self) -> bool:
        buf = self._buf
        if len(buf) < TOKEN_BYTES + _LEN.size:
            return False
        if not hmac.compare_digest(bytes(buf[:TOKEN_BYTES]), self.server.token):
            logger.warning("channel connection with a wrong token refused")
            self.close()
            return False
        (n,) = _LEN.unpack_from(buf, TOKEN_BYTES)
        end = TOKEN_BYTES + _LEN.size + min(n, 256)
        if len(buf) < end:
            return False
        try:
            client_id = bytes(buf[TOKEN_BYTES + _LEN.size:end]).decode()
        except UnicodeDecodeError:
            self.close()
            return False
        del buf[:end]
        self._timer.cancel()
        self.conn = Conn(client_id, self)
        old = self.server.conns.pop(client_id, None)
        if old is not None:
            self.server._ended(old)
        self.server.conns[client_id] = self.conn
        return True

    def _messages(self, msgs: list[dict[str, Any]]) -> None:
        conn = self.conn
        assert conn is not None
        for msg in msgs:
            try:
                self.server.on_message(conn, msg)
            except Exception:  # noqa: BLE001 - one bad message does not end the channel
                logger.exception("channel message %s failed", msg.get("op"))

    def _lost(self, exc: BaseException | None) -> None:
        self._timer.cancel()
        conn = self.conn
        if exc is not None and not isinstance(exc, (ConnectionError, OSError)):
            logger.warning("channel from %s failed: %r", conn.client_id if conn else "?", exc)
        if conn is not None:
            if self.server.conns.get(conn.client_id) is conn:
                del self.server.conns[conn.client_id]
            self.server._ended(conn)
