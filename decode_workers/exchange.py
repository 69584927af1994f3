"""The per-layer hop between attention and expert workers: framed tensors over one TCP
connection per (attention worker, expert worker) pair (loopback on one node).

Why not the alternatives (benchmarks/afd_bench.py measures them; figures in
benchmarks/results/afd/README.md): a Ray actor call per layer costs ~10x the round
trip; torch.distributed point-to-point (gloo here, NCCL on GPUs) is as fast as a socket
but needs one process group over all M + N workers, which must be torn down and rebuilt
by every member when one expert worker dies or is replaced; shared memory needs a
signalling channel anyway and ties the pools to one node. A socket per pair fails alone
(a dead expert worker is a reset connection, seen at once), reconnects alone, and works
across nodes.

Wire format (little endian). Request: header ``<QIIIIB`` (tag, layer, groups, rows,
hidden, dtype code), groups as int32 pairs (expert id, rows), then rows x hidden values.
Reply: header ``<QBIIB`` (tag, status 0 ok / 1 error, rows, hidden, dtype code), then the rows x hidden
outputs, or (status 1) a UTF-8 message of ``rows`` bytes.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

import torch

from cluster.errors import WorkerFailedError
from engine.afd import ExpertExchange, ExpertRequest, ExpertShard, Placement

logger = logging.getLogger(__name__)

_REQ = struct.Struct("<QIIIIB")
_REP = struct.Struct("<QBIIB")
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class ExchangeError(WorkerFailedError):
    """An expert worker could not be reached or failed a request (503 at the ingress)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "expert_failed") -> None:
        super().__init__(message, param, code)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k
    return buf


def _send_parts(sock: socket.socket, parts: list[Any]) -> int:
    """Send the parts back to back with as few system calls as the kernel allows."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    sent = sock.sendmsg(views)
    for v in views:  # the rest, if the kernel took only part
        if sent >= v.nbytes:
            sent -= v.nbytes
            continue
        sock.sendall(v[sent:])
        sent = 0
    return total


def _tensor_bytes(x: torch.Tensor) -> memoryview:
    return memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B")


def _tensor_from(buf: bytearray | memoryview, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    if rows * hidden == 0:
        return torch.empty(rows, hidden, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(rows, hidden)


def encode_request(tag: int, req: ExpertRequest) -> list[bytes | memoryview]:
    rows, hidden = req.x.shape
    flat = [v for pair in req.groups for v in pair]
    return [_REQ.pack(tag, req.layer, len(req.groups), rows, hidden, _DTYPES.index(req.x.dtype))
            + struct.pack(f"<{len(flat)}i", *flat), _tensor_bytes(req.x)]


def read_request(sock: socket.socket) -> tuple[int, ExpertRequest]:
    tag, layer, ngroups, rows, hidden, code = _REQ.unpack(_recv_exact(sock, _REQ.size))
    dtype = _DTYPES[code]
    body = _recv_exact(sock, 8 * ngroups + rows * hidden * dtype.itemsize)  # groups, then rows
    flat = struct.unpack_from(f"<{2 * ngroups}i", body)
    x = _tensor_from(memoryview(body)[8 * ngroups:], rows, hidden, dtype)
    return tag, ExpertRequest(layer, x, list(zip(flat[0::2], flat[1::2])))


class ExpertServer:
    """Serves one ExpertShard to any number of attention workers (M:N): a thread per
    connection reads a request, runs it under the shard's lock (one computation at a
    time; torch keeps its threads to itself) and writes the reply."""

    def __init__(self, shard: ExpertShard, host: str = "127.0.0.1", port: int = 0) -> None:
        self.shard = shard
        self._listener = socket.create_server((host, port))
        self.address = self._listener.getsockname()[:2]
        self._compute = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopping = False
        self.requests = 0
        self.connections = 0
        threading.Thread(target=self._accept, name="expert-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(conn)
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), name="expert-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self._stopping:
                tag, req = read_request(conn)
                try:
                    with self._compute:
                        y = self.shard.run(req)
                    parts: list[Any] = [_REP.pack(tag, 0, y.shape[0], y.shape[1], _DTYPES.index(y.dtype)),
                                        _tensor_bytes(y)]
                except Exception as e:  # noqa: BLE001 - the attention worker gets the message
                    msg = f"{type(e).__name__}: {e}".encode()
                    parts = [_REP.pack(tag, 1, len(msg), 0, 0), msg]
                self.requests += 1
                _send_parts(conn, parts)
        except (ConnectionError, OSError):
            pass  # the attention worker went away (or stop())
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping = True
        self._listener.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


class SocketExchange(ExpertExchange):
    """The attention side's client: one connection per expert shard, opened on first use
    and again after a failure. Every wait is bounded by timeout_s."""

    def __init__(self, placement: Placement, addresses: dict[int, tuple[str, int]] | None = None,
                 timeout_s: float = 30.0, node_ip: str | None = None) -> None:
        super().__init__(placement)
        self.timeout_s = timeout_s
        self.node_ip = node_ip
        self.addresses: dict[int, tuple[str, int]] = dict(addresses or {})
        self._socks: dict[int, socket.socket] = {}
        self._stash: dict[tuple[int, int], torch.Tensor] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.round_trips = 0

    def cost(self, shard: int) -> float:
        addr = self.addresses.get(shard)
        return 0.0 if addr is None or self.node_ip is None or addr[0] == self.node_ip else 1.0

    def set_addresses(self, addresses: dict[int, tuple[str, int]]) -> None:
        """New homes of the shards (a replaced expert worker): changed ones reconnect."""
        for s, addr in addresses.items():
            if self.addresses.get(s) != addr:
                self._drop(s)
        self.addresses = dict(addresses)

    def _drop(self, shard: int) -> None:
        sock = self._socks.pop(shard, None)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        for key in [k for k in self._stash if k[0] == shard]:
            del self._stash[key]

    def _sock(self, shard: int) -> socket.socket:
        sock = self._socks.get(shard)
        if sock is not None:
            return sock
        addr = self.addresses.get(shard)
        if addr is None:
            raise ExchangeError(f"no expert worker for shard {shard} (the controller is replacing it)")
        try:
            sock = socket.create_connection(addr, timeout=min(5.0, self.timeout_s))
        except OSError as e:
            raise ExchangeError(f"expert shard {shard} at {addr[0]}:{addr[1]} unreachable: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout_s)
        self._socks[shard] = sock
        return sock

    def close(self) -> None:
        for s in list(self._socks):
            self._drop(s)

    def reset(self) -> None:
        """After a failed step: replies to its sends may still come; reconnecting drops them."""
        self.close()

    def send(self, shard: int, tag: int, req: ExpertRequest) -> None:
        sock = self._sock(shard)
        try:
            self.bytes_sent += _send_parts(sock, encode_request(tag, req))
        except OSError as e:
            self._drop(shard)
            raise ExchangeError(f"expert shard {shard}: send failed: {e}") from None

    def recv(self, shard: int, tag: int) -> torch.Tensor:
        got = self._stash.pop((shard, tag), None)
        if got is not None:
            return got
        sock = self._sock(shard)
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                rtag, status, rows, hidden, code = _REP.unpack(_recv_exact(sock, _REP.size))
                if status != 0:
                    msg = _recv_exact(sock, rows).decode(errors="replace")
                    raise ExchangeError(f"expert shard {shard} failed: {msg}")
                dtype = _DTYPES[code]
                y = _tensor_from(_recv_exact(sock, rows * hidden * dtype.itemsize), rows, hidden, dtype)
                self.bytes_received += _REP.size + rows * hidden * dtype.itemsize
                if rtag == tag:
                    self.round_trips += 1
                    return y
                # Replies come in send order per connection; another tag is one received
                # out of order by the caller, kept for its recv.
                self._stash[(shard, rtag)] = y
        except (OSError, ConnectionError) as e:
            self._drop(shard)
            raise ExchangeError(f"expert shard {shard}: {type(e).__name__}: {e}") from None
        raise ExchangeError(f"expert shard {shard}: no reply within {self.timeout_s}s")
