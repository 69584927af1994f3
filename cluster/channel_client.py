"""The ingress's end of the channels (cluster.channel): a client per worker, the pool of
them, and the mailbox each request's messages land in."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from cluster.channel import (
    _LEN,
    CONNECT_TIMEOUT_S,
    HIGH_WATER,
    STALL_S,
    ChannelClosedError,
    _frame,
    _Framed,
    _wake,
)

logger = logging.getLogger(__name__)


class Mailbox:
    """The messages of a request from its channel, for one consumer: what asyncio.Queue and
    ``wait_for(queue.get(), timeout)`` did, without a task and two more event-loop turns
    per message (Python 3.11's wait_for wraps the get in a task)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[dict[str, Any]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, msg: dict[str, Any]) -> None:
        self._items.append(msg)
        if self._waiter is not None:
            _wake(self._waiter)

    def empty(self) -> bool:
        return not self._items

    async def get(self, timeout_s: float) -> dict[str, Any]:
        """The next message; asyncio.TimeoutError after ``timeout_s`` without one."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._items:
                raise asyncio.TimeoutError
        return self._items.popleft()


class ChannelClient:
    """The ingress's end of one worker's channel: send requests, and the worker's messages
    are put in the mailbox registered for their request_id."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.closed = False
        self.frames = 0
        self.messages = 0
        self._queues: dict[str, Mailbox | asyncio.Queue[dict[str, Any]]] = {}
        self.protocol = _Framed(self._on_frame, self._on_lost)

    @property
    def transport(self) -> asyncio.Transport:
        assert self.protocol.transport is not None
        return self.protocol.transport

    @classmethod
    async def connect(cls, worker_id: str, info: dict[str, Any], client_id: str,
                      timeout_s: float = CONNECT_TIMEOUT_S) -> ChannelClient:
        client = cls(worker_id)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.create_connection(lambda: client.protocol, info["host"], info["port"]),
                               timeout=timeout_s)
        cid = client_id.encode()
        client.transport.write(info["token"].encode() + _LEN.pack(len(cid)) + cid)
        await asyncio.wait_for(client.protocol.drain(), timeout=timeout_s)
        return client

    def register(self, request_id: str, queue: Mailbox | asyncio.Queue[dict[str, Any]]) -> None:
        self._queues[request_id] = queue
        if self.closed:
            queue.put_nowait(self._closed_msg(request_id))

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def send(self, msg: dict[str, Any], timeout_s: float = STALL_S) -> None:
        if self.closed or self.transport.is_closing():
            raise ChannelClosedError(f"channel to {self.worker_id} is closed")
        self.transport.write(_frame([msg]))
        # Waits only when the socket is backed up (a drain wrapped in wait_for costs a task
        # and event-loop turns per request otherwise).
        if self.transport.get_write_buffer_size() > HIGH_WATER:
            await asyncio.wait_for(self.protocol.drain(), timeout=timeout_s)

    def send_nowait(self, msg: dict[str, Any]) -> None:
        """Fire and forget (aborts, releases): never raises."""
        if not self.closed:
            try:
                self.transport.write(_frame([msg]))
            except Exception:  # noqa: BLE001
                pass

    def _closed_msg(self, request_id: str) -> dict[str, Any]:
        return {"request_id": request_id,
                "error": ChannelClosedError(f"channel to worker {self.worker_id} closed")}

    def _on_frame(self, msgs: list[dict[str, Any]]) -> None:
        self.frames += 1
        self.messages += len(msgs)
        for msg in msgs:
            q = self._queues.get(msg.get("request_id", ""))
            if q is not None:
                q.put_nowait(msg)

    def _on_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not isinstance(exc, (ConnectionError, OSError)):
            logger.warning("channel to %s failed: %r", self.worker_id, exc)
        self.closed = True
        for rid, q in list(self._queues.items()):
            q.put_nowait(self._closed_msg(rid))

    def close(self) -> None:
        self.protocol.close()


class ChannelPool:
    """An ingress's channels, one per worker, opened on first use and reopened after they
    close. info(worker) returns the worker's channel_info (awaitable)."""

    def __init__(self, client_id: str, info: Callable[[Any], Any], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.client_id = client_id
        self.info = info
        self.timeout_s = timeout_s
        self.clients: dict[str, ChannelClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, worker_id: str, handle: Any) -> ChannelClient:
        c = self.clients.get(worker_id)
        if c is not None and not c.closed:
            return c
        lock = self._locks.setdefault(worker_id, asyncio.Lock())
        async with lock:
            c = self.clients.get(worker_id)
            if c is not None and not c.closed:
                return c
            info = await asyncio.wait_for(self.info(handle), timeout=self.timeout_s)
            c = await ChannelClient.connect(worker_id, info, self.client_id, self.timeout_s)
            self.clients[worker_id] = c
            return c

    def stats(self) -> dict[str, int]:
        return {"frames": sum(c.frames for c in self.clients.values()),
                "messages": sum(c.messages for c in self.clients.values())}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()
