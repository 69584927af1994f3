"""KV connector: how a prefill worker's KV cache reaches a decode worker.

Primitives and who calls them:
- ``send(request_id, kv)``: sender side, on the prefill worker once a request's prompt
  KV is computed. Encodes and publishes the KV; returns a ``KVHandle``, small and
  picklable, that travels with the request to the decode worker.
- ``receive(handle, timeout_s)``: receiver side, on the decode worker before the request
  is admitted. Fetches and decodes the KV into a tensor ``[layers, 2, tokens, kv_heads,
  head_dim]`` ready to be written into the paged cache.
- ``release(handle)``: either side, when the transfer is done or abandoned.

Across nodes the KV streams layer by layer while the prompt is computed
(``kvtransfer.stream``: ``begin`` before the prefill, ``sender.add`` per layer from the
engine thread, ``sender.end``), so the receiver can ``receive`` it early (prefetch) and
start decoding once all layers land. Within a node the KV goes through the prefill
worker's shared-memory arena (``kvtransfer.shm``: one copy in, one scatter out, no
serialization), or the Ray object store when the arena is full or absent. Connectors are
chosen per pair of workers by ``get_connector``; the codec per chunk comes from
``kvtransfer.policy``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from kvtransfer.base import TORCH_DTYPES, VIEW_DTYPES, KVHandle, KVTransferError, kv_to_numpy, numpy_to_kv

# The names these had when they lived here (code written before the move still imports them).
_TORCH, _VIEW_DTYPES = TORCH_DTYPES, VIEW_DTYPES

__all__ = ["TORCH_DTYPES", "VIEW_DTYPES", "GrpcConnector", "KVConnector", "KVHandle", "KVTransferError",
           "ObjectStoreConnector", "PairConnector", "ShmConnector", "get_connector", "kv_to_numpy", "numpy_to_kv"]

# write(layer, 0 for keys / 1 for values, first token, kv [n, kv_heads, head_dim]).
KVWriter = Callable[[int, int, int, torch.Tensor], "int | None"]


class KVConnector(Protocol):
    name: str

    def send(self, request_id: str, kv: torch.Tensor) -> KVHandle: ...

    def receive(self, handle: KVHandle, timeout_s: float) -> torch.Tensor: ...

    def release(self, handle: KVHandle) -> None: ...


class ObjectStoreConnector:
    """Ray object store: numpy arrays are read zero-copy from shared memory on one node."""

    name = "object_store"

    def send(self, request_id: str, kv: torch.Tensor) -> KVHandle:
        import ray

        t0 = time.perf_counter()
        arr = kv_to_numpy(kv)
        ref = ray.put(arr)
        return KVHandle(request_id, tuple(kv.shape), str(kv.dtype).removeprefix("torch."),
                        arr.nbytes, self.name, ref, time.perf_counter() - t0)

    def receive(self, handle: KVHandle, timeout_s: float) -> torch.Tensor:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        try:
            arr = ray.get(handle.ref, timeout=timeout_s)
        except GetTimeoutError:
            raise KVTransferError(f"KV of {handle.request_id} did not arrive within {timeout_s}s") from None
        except RayError as e:
            raise KVTransferError(f"KV of {handle.request_id} was lost: {type(e).__name__}: {e}") from None
        if tuple(arr.shape) != tuple(handle.shape):
            raise KVTransferError(f"KV of {handle.request_id} has shape {arr.shape}, expected {handle.shape}")
        return numpy_to_kv(arr, handle.dtype)

    def release(self, handle: KVHandle) -> None:
        handle.ref = None


class ShmConnector:
    """The prefill worker's shared-memory arena (``kvtransfer.shm``). ``send`` returns None
    when the arena is full (or there is none): the caller falls back."""

    name = "shm"

    def __init__(self, arena: Any = None) -> None:
        self.arena = arena  # a kvtransfer.shm.ShmArena on the sender; None on receivers
        self.fallbacks = 0  # sends that did not fit

    def send(self, request_id: str, kv: torch.Tensor) -> KVHandle | None:  # type: ignore[override]
        handle = None if self.arena is None else self.arena.put(request_id, kv)
        if handle is None:
            self.fallbacks += 1
        return handle

    def receive(self, handle: KVHandle, timeout_s: float) -> torch.Tensor:
        from kvtransfer.shm import read

        return read(handle, timeout_s)

    def receive_into(self, handle: KVHandle, write: KVWriter, timeout_s: float) -> None:
        from kvtransfer.shm import read_into

        read_into(handle, write, timeout_s)

    def release(self, handle: KVHandle) -> None:
        handle.ref = None


class GrpcConnector:
    """gRPC stream between nodes, layer by layer (``kvtransfer.stream``). The sender
    publishes to its process's KVServer; the receiver pulls from that address, decoding
    pieces as they arrive. ``policy`` (``kvtransfer.policy.TransferPolicy``) picks the
    codec per chunk: pinned in the manifest, or adaptive."""

    name = "grpc"
    _server: "object | None" = None

    def __init__(self, host: str = "127.0.0.1", rate_gbps: float | None = None, policy: Any = None) -> None:
        from kvtransfer.policy import PolicySpec, TransferPolicy

        self.host = host
        self.rate_gbps = rate_gbps
        self.policy = policy if policy is not None else TransferPolicy(PolicySpec())
        self._sender: Any = None

    def _kv_server(self) -> Any:
        from kvtransfer.grpc_transport import KVServer

        if GrpcConnector._server is None:
            GrpcConnector._server = KVServer(self.host, 0, rate_gbps=self.rate_gbps)
        return GrpcConnector._server

    @property
    def sender(self) -> Any:
        from kvtransfer.stream import StreamSender

        if self._sender is None:
            server = self._kv_server()
            server.on_stream_done = lambda rid, dest, n, busy: self.policy.observe_link(self.host, dest, n, busy)
            self._sender = StreamSender(server, on_encoded=self.policy.observe_encode)
        return self._sender

    def begin(self, request_id: str, shape: tuple[int, ...], dtype: str, dest: str | None,
              arrival: float | None = None) -> KVHandle:
        """Open a streamed transfer; feed it with ``sender.add`` and ``sender.end``."""
        itemsize = 4 if dtype == "float32" else 2
        per_token = math.prod(shape) // shape[2] * itemsize if shape[2] else 0
        planner = self.policy.planner(self.host, dest or "?", per_token, arrival)
        return self.sender.begin(request_id, tuple(shape), dtype, dest, planner)

    def send(self, request_id: str, kv: torch.Tensor, dest: str | None = None) -> KVHandle:
        """The whole KV at once (tensor-parallel prefill, tests): streamed all the same."""
        t0 = time.perf_counter()
        handle = self.begin(request_id, tuple(kv.shape), str(kv.dtype).removeprefix("torch."), dest)
        for layer in range(kv.shape[0]):
            self.sender.add(request_id, layer, 0, kv[layer])
        self.sender.end(request_id)
        handle.send_s = time.perf_counter() - t0
        return handle

    def receive_detailed(self, handle: KVHandle, timeout_s: float) -> Any:
        from kvtransfer.stream import receive_stream

        return receive_stream(handle, timeout_s)

    def receive(self, handle: KVHandle, timeout_s: float) -> torch.Tensor:
        """KV of the prompt's first ``kv_tokens`` tokens (all of them unless the sender
        chose to have a suffix recomputed)."""
        return self.receive_detailed(handle, timeout_s).kv

    def release(self, handle: KVHandle) -> None:
        handle.ref = None


TRANSPORTS = ("auto", "shm", "object_store", "grpc")


class PairConnector:
    """Chooses the transport per pair of workers: same node -> the sender's shared-memory
    arena when it has one and the KV fits (else the object store), other node -> gRPC,
    unless the manifest pins one (``shm`` behaves as ``auto``; ``object_store`` skips the
    arena). Receivers dispatch on the handle's transport."""

    def __init__(self, transport: str = "auto", node_ip: str = "127.0.0.1",
                 rate_gbps: float | None = None, policy: Any = None, arena: Any = None) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown KV transport {transport!r}; allowed: {', '.join(TRANSPORTS)}")
        self.transport = transport
        self.node_ip = node_ip
        self.object_store = ObjectStoreConnector()
        self.grpc = GrpcConnector(node_ip, rate_gbps, policy)
        self.shm = ShmConnector(arena if transport in ("auto", "shm") else None)

    def pick(self, dest_node_ip: str | None) -> KVConnector:
        if self.transport == "grpc" or (self.transport in ("auto", "shm")
                                        and dest_node_ip not in (None, self.node_ip)):
            return self.grpc
        if self.shm.arena is not None:
            return self.shm  # type: ignore[return-value]
        return self.object_store

    def send(self, request_id: str, kv: torch.Tensor, dest_node_ip: str | None = None) -> KVHandle:
        conn = self.pick(dest_node_ip)
        if conn is self.grpc:
            return self.grpc.send(request_id, kv, dest_node_ip)
        if conn is self.shm:
            handle = self.shm.send(request_id, kv)
            if handle is not None:
                return handle
            # The arena is full: the object store takes it.
        return self.object_store.send(request_id, kv)

    def receive_detailed(self, handle: KVHandle, timeout_s: float) -> Any:
        """A ``kvtransfer.stream.Received`` (kv, kv_tokens, choices, nbytes, attempts)."""
        if handle.transport == "grpc":
            return self.grpc.receive_detailed(handle, timeout_s)
        from kvtransfer.stream import Received

        conn = self.shm if handle.transport == "shm" else self.object_store
        kv = conn.receive(handle, timeout_s)
        return Received(kv, kv.shape[2], [], handle.nbytes, 1)  # raw, not chunked

    def receive_into(self, handle: KVHandle, write: KVWriter, timeout_s: float) -> Any:
        """Hand the KV to ``write`` piece by piece (the scatter into reserved blocks): out
        of shared memory directly for ``shm`` handles, else after receiving it whole.
        Returns the ``Received`` record with ``kv`` None (it went to ``write``)."""
        from kvtransfer.stream import Received

        if handle.transport == "shm":
            self.shm.receive_into(handle, write, timeout_s)
            return Received(None, handle.shape[2], [], handle.nbytes, 1)  # type: ignore[arg-type]
        got = self.receive_detailed(handle, timeout_s)
        for layer in range(got.kv.shape[0]):
            for j in (0, 1):
                write(layer, j, 0, got.kv[layer, j])
        got.kv = None
        return got

    def receive(self, handle: KVHandle, timeout_s: float) -> torch.Tensor:
        return self.receive_detailed(handle, timeout_s).kv

    def release(self, handle: KVHandle) -> None:
        handle.ref = None


def get_connector(transport: str = "auto", node_ip: str = "127.0.0.1",
                  rate_gbps: float | None = None, policy: Any = None, arena: Any = None) -> PairConnector:
    """Codecs (``policy``) apply to the gRPC (cross-node) path; within a node KV moves raw.
    ``arena``: the sender's ``kvtransfer.shm.ShmArena`` (prefill workers), if any."""
    return PairConnector(transport, node_ip, rate_gbps, policy, arena)
