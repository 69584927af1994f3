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


def get_connector(transport: str = "auto") -> KVConnector:
    if transport in ("auto", "object_store"):
        return ObjectStoreConnector()
    raise ValueError(f"unknown KV transport {transport!r}; allowed: auto, object_store")
