"""The per-layer hop between attention and expert workers: framed tensors over one TCP
connection per (attention worker, expert worker) pair (loopback on one node).

Why not the alternatives (benchmarks/afd_bench.py measures them; figures in
benchmarks/results/2026-12-06-afd/README.md): a Ray actor call per layer costs ~10x the
round trip; torch.distributed point-to-point (gloo here, NCCL on GPUs) is as fast as a
socket but needs one process group over all M + N workers, which must be torn down and
rebuilt by every member when one expert worker dies or is replaced; shared memory alone
needs a signalling channel and its own failure detection and ties the pools to one node,
so it carries the payloads beside the socket (below), not instead of it. A socket per
pair fails alone (a dead expert worker is a reset connection, seen at once), reconnects
alone, and works across nodes.

**Same node: payloads in shared memory.** When an expert worker is on the attention
worker's node (``cost`` 0), the client creates a segment in /dev/shm (``slots`` regions of
``slot_bytes``, 4 x 2 MiB by default, reserved at once so that a full /dev/shm means a
socket-only connection rather than a fault mid-step), hands its name to the server in a hello message and unlinks it once the
server has mapped it (nothing is left behind if either dies). A request's rows are then
copied into a free region, the server computes on them there and writes the outputs back
into the same region; only the headers cross the socket, which stays the doorbell and
the failure detector (a dead peer is a reset connection, seen at once; every wait is
bounded by the socket timeout). A payload larger than a region, no free region, or a
server that cannot map the segment: that message goes inline over the socket as before.
Across nodes the socket carries everything. ``SPLITSERVE_AFD_SHM=0`` turns the shared
memory off.

Wire format (little endian). Request: header ``<QIIIIB`` (tag, layer, groups, rows,
hidden, dtype code), groups as int32 pairs (expert id, rows), then rows x hidden values.
Reply: header ``<QBIIB`` (tag, status 0 ok / 1 error, rows, hidden, dtype code), then the rows x hidden
outputs, or (status 1) a UTF-8 message of ``rows`` bytes. A dtype code with bit 0x80 set
means the rows are in shared-memory region ``<I`` (sent after the groups, or after the
reply header) instead of following. Hello (client to server, once): a request header
with layer 0xFFFFFFFF, rows = name length, hidden = slots, groups = 0, then ``<Q`` slot
bytes and the segment name; the reply's status says whether the server mapped it.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from typing import Any

import torch

from cluster.errors import WorkerFailedError
from engine.experts import ExpertExchange, ExpertRequest, ExpertShard, Placement

logger = logging.getLogger(__name__)

_REQ = struct.Struct("<QIIIIB")
_REP = struct.Struct("<QBIIB")
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_SHM = 0x80  # dtype-code flag: the rows are in a shared-memory region
_SLOT = struct.Struct("<I")
_HELLO_LAYER = 0xFFFFFFFF
SHM_DIR = "/dev/shm"


def shm_enabled() -> bool:
    return os.environ.get("SPLITSERVE_AFD_SHM", "1") != "0" and os.path.isdir(SHM_DIR)


class _Segment:
    """A mapped /dev/shm file cut into ``slots`` regions of ``slot_bytes``."""

    def __init__(self, path: str, slots: int, slot_bytes: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # Reserved now (ENOSPC here, a socket-only connection), not on first touch:
                # a full /dev/shm (a container's default 64 MiB) would be SIGBUS mid-step.
                os.posix_fallocate(fd, 0, slots * slot_bytes)
            elif os.fstat(fd).st_size < slots * slot_bytes:
                raise ValueError(f"{path}: smaller than {slots} x {slot_bytes} bytes")
            self.map = mmap.mmap(fd, slots * slot_bytes)
        finally:
            os.close(fd)
        self.path, self.slots, self.slot_bytes = path, slots, slot_bytes
        self.view = memoryview(self.map)

    def region(self, slot: int, nbytes: int) -> memoryview:
        if not 0 <= slot < self.slots or nbytes > self.slot_bytes:
            raise ValueError(f"region {slot} of {nbytes} bytes outside {self.slots} x {self.slot_bytes}")
        return self.view[slot * self.slot_bytes: slot * self.slot_bytes + nbytes]

    def close(self) -> None:
        try:
            self.view.release()
            self.map.close()
        except (BufferError, ValueError):
            pass  # a tensor still views it: the mapping goes with the process


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


def read_request(sock: socket.socket, segment: _Segment | None = None,
                 head: bytes | bytearray | None = None) -> tuple[int, ExpertRequest, int | None]:
    """(tag, request, shared-memory region of its rows or None); head: the header, if read."""
    tag, layer, ngroups, rows, hidden, code = _REQ.unpack(head if head is not None else _recv_exact(sock, _REQ.size))
    dtype = _DTYPES[code & ~_SHM]
    if code & _SHM:
        body = _recv_exact(sock, 8 * ngroups + _SLOT.size)
        (slot,) = _SLOT.unpack_from(body, 8 * ngroups)
        if segment is None:
            raise ConnectionError("a shared-memory request before the hello")
        x = _tensor_from(segment.region(slot, rows * hidden * dtype.itemsize), rows, hidden, dtype)
    else:
        slot = None
        body = _recv_exact(sock, 8 * ngroups + rows * hidden * dtype.itemsize)  # groups, then rows
        x = _tensor_from(memoryview(body)[8 * ngroups:], rows, hidden, dtype)
    flat = struct.unpack_from(f"<{2 * ngroups}i", body)
    return tag, ExpertRequest(layer, x, list(zip(flat[0::2], flat[1::2]))), slot


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
        self.shm_connections = 0  # connections whose payloads go through shared memory
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

    def _hello(self, conn: socket.socket, name_len: int, slots: int) -> _Segment | None:
        (slot_bytes,) = struct.unpack("<Q", _recv_exact(conn, 8))
        name = _recv_exact(conn, name_len).decode()
        try:
            if "/" in name or not name.startswith("splitserve-afd-"):
                raise ValueError(f"not a splitserve segment name: {name!r}")
            seg: _Segment | None = _Segment(os.path.join(SHM_DIR, name), slots, slot_bytes, create=False)
            status, msg = 0, b""
        except (OSError, ValueError) as e:
            seg, status, msg = None, 1, f"{type(e).__name__}: {e}".encode()
        _send_parts(conn, [_REP.pack(0, status, len(msg), 0, 0), msg])
        if seg is not None:
            self.shm_connections += 1
        return seg

    def _serve(self, conn: socket.socket) -> None:
        segment: _Segment | None = None
        try:
            while not self._stopping:
                head = _recv_exact(conn, _REQ.size)
                _, layer, _, rows, hidden, _ = _REQ.unpack(head)
                if layer == _HELLO_LAYER:
                    segment = self._hello(conn, rows, hidden)
                    continue
                tag, req, slot = read_request(conn, segment, head)
                try:
                    with self._compute:
                        y = self.shard.run(req)
                    code = _DTYPES.index(y.dtype)
                    if slot is not None and segment is not None:
                        # The outputs go back where the rows came from (same size).
                        out = _tensor_from(segment.region(slot, y.numel() * y.element_size()), y.shape[0],
                                           y.shape[1], y.dtype)
                        out.copy_(y)
                        parts: list[Any] = [_REP.pack(tag, 0, y.shape[0], y.shape[1], code | _SHM),
                                            _SLOT.pack(slot)]
                    else:
                        parts = [_REP.pack(tag, 0, y.shape[0], y.shape[1], code), _tensor_bytes(y)]
                except Exception as e:  # noqa: BLE001 - the attention worker gets the message
                    msg = f"{type(e).__name__}: {e}".encode()
                    parts = [_REP.pack(tag, 1, len(msg), 0, 0), msg]
                self.requests += 1
                _send_parts(conn, parts)
        except (ConnectionError, OSError):
            pass  # the attention worker went away (or stop())
        finally:
            conn.close()
            if segment is not None:
                segment.close()

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
    and again after a failure; payloads through shared memory to expert workers on this
    node (``shm``: default on unless SPLITSERVE_AFD_SHM=0). Every wait is bounded by
    timeout_s."""

    def __init__(self, placement: Placement, addresses: dict[int, tuple[str, int]] | None = None,
                 timeout_s: float = 30.0, node_ip: str | None = None, shm: bool | None = None,
                 slots: int = 4, slot_bytes: int = 2 << 20) -> None:
        super().__init__(placement)
        self.timeout_s = timeout_s
        self.node_ip = node_ip
        self.shm = shm_enabled() if shm is None else shm
        self.slots, self.slot_bytes = slots, slot_bytes
        self.addresses: dict[int, tuple[str, int]] = dict(addresses or {})
        self._socks: dict[int, socket.socket] = {}
        self._segments: dict[int, _Segment] = {}
        self._free: dict[int, list[int]] = {}  # free regions per shard
        self._stash: dict[tuple[int, int], torch.Tensor] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.round_trips = 0
        self.shm_messages = 0  # requests whose rows went through shared memory

    def cost(self, shard: int) -> float:
        addr = self.addresses.get(shard)
        return 0.0 if addr is None or self.node_ip is None or addr[0] == self.node_ip else 1.0

    def uses_shm(self, shard: int) -> bool:
        """Whether the connection to a shard carries its payloads in shared memory."""
        return shard in self._segments

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
        seg = self._segments.pop(shard, None)
        if seg is not None:
            seg.close()
        self._free.pop(shard, None)
        for key in [k for k in self._stash if k[0] == shard]:
            del self._stash[key]

    def _hello(self, shard: int, sock: socket.socket) -> None:
        """Offer the server a shared-memory segment; on refusal the socket carries all."""
        name = f"splitserve-afd-{os.getpid()}-{secrets.token_hex(6)}"
        path = os.path.join(SHM_DIR, name)
        try:
            seg = _Segment(path, self.slots, self.slot_bytes, create=True)
        except OSError as e:
            try:
                os.unlink(path)
            except OSError:
                pass
            logger.warning("expert shard %d: no shared memory (%s); payloads go over the socket", shard, e)
            return
        try:
            raw = name.encode()
            _send_parts(sock, [_REQ.pack(0, _HELLO_LAYER, 0, len(raw), self.slots, 0),
                               struct.pack("<Q", self.slot_bytes), raw])
            _, status, n, _, _ = _REP.unpack(_recv_exact(sock, _REP.size))
            msg = _recv_exact(sock, n).decode(errors="replace") if n else ""
        except BaseException:
            seg.close()
            raise
        finally:
            os.unlink(path)  # both sides have mapped it (or never will): nothing left behind
        if status != 0:
            seg.close()
            logger.warning("expert shard %d could not map shared memory (%s); payloads go over the socket",
                           shard, msg)
            return
        self._segments[shard] = seg
        self._free[shard] = list(range(self.slots))

    def _sock(self, shard: int) -> socket.socket:
        sock = self._socks.get(shard)
        if sock is not None:
            return sock
        addr = self.addresses.get(shard)
        if addr is None:
            raise ExchangeError(f"no expert worker for shard {shard} (the controller is replacing it)")
        try:
            sock = socket.create_connection(addr, timeout=min(5.0, self.timeout_s))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout_s)
            if self.shm and self.cost(shard) == 0.0:
                self._hello(shard, sock)
        except OSError as e:
            self._drop(shard)
            raise ExchangeError(f"expert shard {shard} at {addr[0]}:{addr[1]} unreachable: {e}") from None
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
        seg, free = self._segments.get(shard), self._free.get(shard)
        nbytes = req.x.numel() * req.x.element_size()
        try:
            if seg is not None and free and nbytes <= seg.slot_bytes:
                slot = free.pop()
                rows, hidden = req.x.shape
                _tensor_from(seg.region(slot, nbytes), rows, hidden, req.x.dtype).copy_(req.x)
                flat = [v for pair in req.groups for v in pair]
                head = (_REQ.pack(tag, req.layer, len(req.groups), rows, hidden, _DTYPES.index(req.x.dtype) | _SHM)
                        + struct.pack(f"<{len(flat)}i", *flat) + _SLOT.pack(slot))
                self.bytes_sent += _send_parts(sock, [head])
                self.shm_messages += 1
            else:
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
                    # Its region (if any) is not named in an error reply: start afresh.
                    self._drop(shard)
                    raise ExchangeError(f"expert shard {shard} failed: {msg}")
                dtype = _DTYPES[code & ~_SHM]
                nbytes = rows * hidden * dtype.itemsize
                if code & _SHM:
                    (slot,) = _SLOT.unpack(_recv_exact(sock, _SLOT.size))
                    seg = self._segments[shard]
                    y = _tensor_from(seg.region(slot, nbytes), rows, hidden, dtype).clone()
                    self._free[shard].append(slot)
                    self.bytes_received += _REP.size + _SLOT.size
                else:
                    y = _tensor_from(_recv_exact(sock, nbytes), rows, hidden, dtype)
                    self.bytes_received += _REP.size + nbytes
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
