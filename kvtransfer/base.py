"""What kvtransfer's modules share: ``KVTransferError``, ``KVHandle`` (what travels with a
request from the prefill worker to the decode worker) and the dtype helpers. It imports
nothing of the project, so ``connector``, ``stream`` and ``grpc_transport`` all import it
and none of them needs another for these (no import cycle); ``connector`` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# numpy has no bfloat16: such KV travels as its raw 16-bit pattern.
VIEW_DTYPES = {torch.bfloat16: (np.int16, torch.int16)}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    if kv.dtype in VIEW_DTYPES:
        return kv.view(VIEW_DTYPES[kv.dtype][1]).numpy()
    return kv.numpy()


def numpy_to_kv(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(arr)
    want = TORCH_DTYPES[dtype]
    return t.view(want) if want in VIEW_DTYPES else t


# Environment variable that carries a deployment's KV token to its workers (the controller
# sets it; kvtransfer.grpc_transport checks and presents it).
KV_TOKEN_ENV = "SPLITSERVE_KV_TOKEN"
