"""What a worker hosting vLLM and its in-process KV connector share (no vLLM import).

vLLM builds its connectors itself (``kv_transfer_config.kv_connector_module_path``), both
roles in the worker's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the scheduler-side
connector inside vLLM's scheduler, the worker-side one inside its model runner. They find
the worker's ``Channel`` by the engine id the worker put in ``kv_transfer_config``.

- Loads (decode side): the worker fetched a request's prompt KV through kvtransfer
  (object store or gRPC stream, codecs applied) before adding the request; the connector
  writes it into the blocks vLLM allocated, then drops it.
- Saves (prefill side): the connector copies each layer's new KV out of vLLM's paged
  cache as the layer completes and hands it here: to ``on_layer_kv`` (kvtransfer's stream
  sender) for streamed requests, else into the request's export buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

# on_layer_kv(request id, layer, first token, kv [2, n, kv_heads, head_dim]).
LayerSink = Callable[[str, int, int, torch.Tensor], None]

_CHANNELS: dict[str, "Channel"] = {}
_LOCK = threading.Lock()


class Channel:
    def __init__(self, engine_id: str, num_layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.engine_id = engine_id
        self.num_layers, self.kv_heads, self.head_dim, self.dtype = num_layers, kv_heads, head_dim, dtype
        self.lock = threading.Lock()
        # Decode side: request id -> KV [layers, 2, tokens, kv_heads, head_dim] to load.
        self.loads: dict[str, torch.Tensor] = {}
        # Prefill side: request id -> export buffer (whole prompt), or streamed requests.
        self.exports: dict[str, torch.Tensor] = {}
        self.streamed: set[str] = set()
        self.on_layer_kv: LayerSink | None = None
        # Request id -> monotonic time vLLM first scheduled it.
        self.first_scheduled: dict[str, float] = {}
        # Request id -> why its KV could not be loaded.
        self.load_errors: dict[str, str] = {}
        # Counters (tests, health): loads written, tokens saved.
        self.loaded = 0
        self.saved_tokens = 0

    # -- the worker ---------------------------------------------------------------------
    def expect_save(self, request_id: str, num_tokens: int, stream: bool) -> None:
        with self.lock:
            if stream:
                self.streamed.add(request_id)
            else:
                self.exports[request_id] = torch.empty(self.num_layers, 2, num_tokens, self.kv_heads,
                                                       self.head_dim, dtype=self.dtype)

    def take_export(self, request_id: str) -> torch.Tensor | None:
        with self.lock:
            self.streamed.discard(request_id)
            return self.exports.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        """Drop everything held for a request (finished, aborted, failed)."""
        with self.lock:
            self.loads.pop(request_id, None)
            self.exports.pop(request_id, None)
            self.streamed.discard(request_id)
            self.first_scheduled.pop(request_id, None)
            self.load_errors.pop(request_id, None)

    def held(self) -> int:
        """Requests with KV held here (0 when idle: nothing leaks)."""
        with self.lock:
            return len(self.loads) + len(self.exports) + len(self.streamed)

    # -- the connector ------------------------------------------------------------------
    def saved(self, request_id: str, layer: int, first: int, kv: torch.Tensor) -> None:
        """One layer's KV of tokens first..first+n of a request (a copy)."""
        if request_id in self.streamed:
            sink = self.on_layer_kv
            if sink is not None:
                sink(request_id, layer, first, kv)
        else:
            buf = self.exports.get(request_id)
            if buf is None:
                return
            n = min(kv.shape[1], buf.shape[2] - first)
            if n > 0:
                buf[layer, :, first:first + n] = kv[:, :n]
        if layer == 0:
            self.saved_tokens += kv.shape[1]


def register(channel: Channel) -> None:
    with _LOCK:
        _CHANNELS[channel.engine_id] = channel


def unregister(engine_id: str) -> None:
    with _LOCK:
        _CHANNELS.pop(engine_id, None)


def lookup(engine_id: str | None) -> Channel:
    with _LOCK:
        ch = _CHANNELS.get(engine_id or "")
    if ch is None:
        raise RuntimeError(f"no splitserve KV channel for engine {engine_id!r}: the splitserve "
                           "connector runs only inside a splitserve worker hosting vLLM in-process "
                           "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return ch


def channel_params(request_id: str, load: bool = False, save: bool = False) -> dict[str, Any]:
    """``kv_transfer_params`` of a request (SamplingParams.extra_args)."""
    return {"splitserve_id": request_id, "load": load, "save": save}
