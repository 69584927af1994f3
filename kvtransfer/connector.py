"""KV connector: how a prefill worker's KV cache reaches a decode worker.

Primitives and who calls them:
- ``send(request_id, kv)``: sender side, on the prefill worker once a request's prompt
  KV is computed. Encodes and publishes the KV; returns a ``KVHandle``, small and
  picklable, that travels with the request to the decode worker.
- ``receive(handle, timeout_s)``: receiver side, on the decode worker before the request
  is admitted. Fetches and decodes the KV into a tensor ``[layers, 2, tokens, kv_heads,
  head_dim]`` ready to be written into the paged cache.
- ``release(handle)``: either side, when the transfer is done or abandoned.

Connectors are chosen per pair of workers by ``get_connector``; codecs and the gRPC
transport plug in here (a later issue).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

# numpy has no bfloat16: such KV travels as its raw 16-bit pattern.
_VIEW_DTYPES = {torch.bfloat16: (np.int16, torch.int16)}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVTransferError(RuntimeError):
    """A transfer that failed: timeout, lost object, bad payload."""


@dataclass
class KVHandle:
    # Request whose prompt KV this is.
    request_id: str
    # Shape of the KV: [layers, 2, tokens, kv_heads, head_dim].
    shape: tuple[int, ...]
    # torch dtype name of the KV ("float32", "bfloat16", ...).
    dtype: str
    # Bytes that travel (after encoding).
    nbytes: int
    # Connector that made it ("object_store", ...).
    transport: str
    # Transport-specific locator (an ObjectRef for the object store).
    ref: Any
    # Wall time spent on the sender side (encode + publish), seconds.
    send_s: float = 0.0


def kv_to_numpy(kv: torch.Tensor) -> np.ndarray:
    kv = kv.detach().contiguous().cpu()
    if kv.dtype in _VIEW_DTYPES:
        return kv.view(_VIEW_DTYPES[kv.dtype][1]).numpy()
    return kv.numpy()


def numpy_to_kv(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(arr)
    want = _TORCH[dtype]
    return t.view(want) if want in _VIEW_DTYPES else t


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


class GrpcConnector:
    """gRPC stream between nodes. The sender encodes with its codec and publishes to its
    process's KVServer; the receiver pulls from that address and decodes (the stream's
    header names the codec)."""

    name = "grpc"
    _server: "object | None" = None

    def __init__(self, host: str = "127.0.0.1", rate_gbps: float | None = None, codec: str = "none") -> None:
        from kvtransfer.codec import get_codec

        self.host = host
        self.rate_gbps = rate_gbps
        self.codec = get_codec(codec)

    def _kv_server(self) -> Any:
        from kvtransfer.grpc_transport import KVServer

        if GrpcConnector._server is None:
            GrpcConnector._server = KVServer(self.host, 0, rate_gbps=self.rate_gbps)
        return GrpcConnector._server

    def send(self, request_id: str, kv: torch.Tensor) -> KVHandle:
        t0 = time.perf_counter()
        data = self.codec.encode(kv)
        server = self._kv_server()
        server.publish(request_id, data)
        return KVHandle(request_id, tuple(kv.shape), str(kv.dtype).removeprefix("torch."),
                        len(data), self.name, server.address, time.perf_counter() - t0)

    def receive(self, handle: KVHandle, timeout_s: float) -> torch.Tensor:
        from kvtransfer.grpc_transport import fetch

        from kvtransfer.codec import CodecError, decode_any

        data = fetch(handle.ref, handle.request_id, timeout_s)
        if len(data) != handle.nbytes:
            raise KVTransferError(f"KV of {handle.request_id}: {len(data)} bytes arrived, "
                                  f"{handle.nbytes} were sent")
        try:
            kv = decode_any(data)
        except CodecError as e:
            raise KVTransferError(f"KV of {handle.request_id} could not be decoded: {e}") from None
        if tuple(kv.shape) != tuple(handle.shape):
            raise KVTransferError(f"KV of {handle.request_id} decoded to {tuple(kv.shape)}, expected {handle.shape}")
        return kv

    def release(self, handle: KVHandle) -> None:
        handle.ref = None


class PairConnector:
    """Chooses the transport per pair of workers: same node -> object store, else gRPC,
    unless the manifest pins one. Receivers dispatch on the handle's transport."""

    def __init__(self, transport: str = "auto", node_ip: str = "127.0.0.1",
                 rate_gbps: float | None = None, codec: str = "none") -> None:
        if transport not in ("auto", "object_store", "grpc"):
            raise ValueError(f"unknown KV transport {transport!r}; allowed: auto, object_store, grpc")
        self.transport = transport
        self.node_ip = node_ip
        self.object_store = ObjectStoreConnector()
        self.grpc = GrpcConnector(node_ip, rate_gbps, codec)

    def pick(self, dest_node_ip: str | None) -> KVConnector:
        if self.transport == "grpc" or (self.transport == "auto" and dest_node_ip not in (None, self.node_ip)):
            return self.grpc
        return self.object_store

    def send(self, request_id: str, kv: torch.Tensor, dest_node_ip: str | None = None) -> KVHandle:
        return self.pick(dest_node_ip).send(request_id, kv)

    def receive(self, handle: KVHandle, timeout_s: float) -> torch.Tensor:
        conn: KVConnector = self.grpc if handle.transport == "grpc" else self.object_store
        return conn.receive(handle, timeout_s)

    def release(self, handle: KVHandle) -> None:
        handle.ref = None


def get_connector(transport: str = "auto", node_ip: str = "127.0.0.1",
                  rate_gbps: float | None = None, codec: str = "none") -> PairConnector:
    """Codecs apply to the gRPC (cross-node) path; within a node KV moves raw."""
    return PairConnector(transport, node_ip, rate_gbps, codec)
