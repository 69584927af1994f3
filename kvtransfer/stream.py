"""Layer-wise KV streaming between a prefill and a decode worker over gRPC.

Sender side (prefill worker), in the order it calls them:
- ``StreamSender.begin(request_id, shape, dtype, dest, planner)``: before the prompt is
  computed. Opens the request's entry on this process's ``KVServer`` and returns the
  ``KVHandle`` (address + request id) that the decode worker may redeem at once
  (``prefetch``), so the network overlaps the rest of the prefill.
- ``StreamSender.add(request_id, layer, first_token, kv)``: from the engine thread, right
  after layer ``layer`` of a step has written its KV (``kv``: ``[2, n, kv_heads,
  head_dim]``, a copy, for tokens ``first_token .. first_token + n``). The first call
  plans the transfer (``planner``: a codec label per chunk of ``chunk_tokens`` tokens,
  ``"recompute"`` for a suffix not worth sending); each time a layer completes a chunk,
  that (chunk, layer) piece is encoded on the sender thread and appended to the stream,
  while the engine computes the next layer.
- ``StreamSender.end(request_id)``: the prompt is done; closes the stream after the last
  piece. ``abort(request_id, reason)``: the prefill failed; the receiver learns why.

Receiver side (decode worker): ``receive_stream(handle, timeout_s)`` pulls the stream,
checks and decodes each piece as it arrives (decoding overlaps the network), verifies
every (chunk, layer) of the sent prefix arrived exactly once, releases the sender's copy,
and returns the KV of the first ``kv_tokens`` prompt tokens; the engine recomputes the
rest. A failed stream (checksum, cut, dead sender, deadline) is fetched again once; a
second failure is a ``KVTransferError``.

Wire: the transport's byte stream carries parts ``magic "KVP1" | layer u16 | kind u16 |
first token u32 | tokens u32 | length u32 | body``. The first part (kind 1) is the plan
(JSON: kv_tokens, chunk_tokens, choices); every other part (kind 0) is one codec stream
(self-describing, CRC-checked) of one layer of one chunk.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvtransfer.adaptive import RECOMPUTE
from kvtransfer.base import KVHandle, KVTransferError

logger = logging.getLogger(__name__)

PART = struct.Struct("<4sHHIII")
PART_MAGIC = b"KVP1"
KIND_KV, KIND_PLAN = 0, 1


@dataclass
class StreamPlan:
    # Codec label per chunk ("none", "lossless", "int8", "cachegen:3") or "recompute".
    choices: list[str]
    # Tokens per chunk (the last chunk may be shorter).
    chunk_tokens: int
    # Predicted seconds until the KV has landed (or been recomputed).
    predicted_s: float = 0.0
    # Whether the prediction meets the budget.
    meets_budget: bool = True

    def kv_tokens(self, num_tokens: int) -> int:
        """Tokens whose KV is sent: those before the first chunk to recompute."""
        for i, c in enumerate(self.choices):
            if c == RECOMPUTE:
                return min(i * self.chunk_tokens, num_tokens)
        return num_tokens


# planner(num_tokens) -> StreamPlan, called once, from the engine thread, when the
# prompt's first layer of KV exists (queueing is over).
Planner = Callable[[int], StreamPlan]


@dataclass
class _Outgoing:
    shape: tuple[int, ...]
    planner: Planner
    plan: StreamPlan | None = None
    kv_tokens: int = 0
    # Per layer: pieces not yet cut into chunks, first token they hold, tokens held.
    pending: list[list[torch.Tensor]] = field(default_factory=list)
    pending_from: list[int] = field(default_factory=list)
    next_token: list[int] = field(default_factory=list)
    failed: bool = False


# (label, raw bytes, encoded bytes, encode seconds) after each encoded piece.
EncodeObserver = Callable[[str, int, int, float], None]


class StreamSender:
    """One per prefill worker; pieces are encoded and appended on one thread, in order."""

    def __init__(self, server: Any, on_encoded: EncodeObserver | None = None) -> None:
        self.server = server
        self.on_encoded = on_encoded
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-encode")
        self._out: dict[str, _Outgoing] = {}
        self._codecs: dict[tuple[str, int, int], Any] = {}

    def begin(self, request_id: str, shape: tuple[int, ...], dtype: str, dest: str | None,
              planner: Planner) -> KVHandle:
        layers = shape[0]
        self.server.open(request_id, dest)
        self._out[request_id] = _Outgoing(tuple(shape), planner, pending=[[] for _ in range(layers)],
                                          pending_from=[0] * layers, next_token=[0] * layers)
        return KVHandle(request_id, tuple(shape), dtype, 0, "grpc", self.server.address)

    def active(self, request_id: str) -> bool:
        return request_id in self._out

    # -- engine thread ----------------------------------------------------------------
    def add(self, request_id: str, layer: int, first: int, kv: torch.Tensor) -> None:
        o = self._out.get(request_id)
        if o is None or o.failed:
            return
        if o.plan is None:
            try:
                o.plan = o.planner(o.shape[2])
            except Exception as e:  # noqa: BLE001 - a planning bug fails this transfer only
                self.abort(request_id, f"planning the transfer failed: {e!r}")
                return
            o.kv_tokens = o.plan.kv_tokens(o.shape[2])
            body = json.dumps({"kv_tokens": o.kv_tokens, "chunk_tokens": o.plan.chunk_tokens,
                               "choices": o.plan.choices, "predicted_s": o.plan.predicted_s}).encode()
            self.server.append(request_id, PART.pack(PART_MAGIC, 0, KIND_PLAN, 0, 0, len(body)) + body)
        if first < o.next_token[layer]:  # recomputed after a preemption: already handed over
            kv = kv[:, o.next_token[layer] - first:]
            first = o.next_token[layer]
        if first != o.next_token[layer]:
            self.abort(request_id, f"layer {layer} KV skipped tokens {o.next_token[layer]}..{first}")
            return
        n = min(kv.shape[1], max(0, o.kv_tokens - first))
        o.next_token[layer] = first + kv.shape[1]
        if n <= 0:
            return
        if not o.pending[layer]:
            o.pending_from[layer] = first
        o.pending[layer].append(kv[:, :n])
        have = first + n
        c = o.plan.chunk_tokens
        # Cut every chunk this layer has completed.
        while o.pending[layer]:
            start = o.pending_from[layer]
            end = min(start - start % c + c, o.kv_tokens)
            if have < end:
                break
            buf = torch.cat(o.pending[layer], dim=1) if len(o.pending[layer]) > 1 else o.pending[layer][0]
            piece, rest = buf[:, : end - start], buf[:, end - start:]
            o.pending[layer] = [rest] if rest.shape[1] else []
            o.pending_from[layer] = end
            self._pool.submit(self._encode, request_id, o, layer, start, piece)

    # -- event loop -------------------------------------------------------------------
    def end(self, request_id: str) -> None:
        o = self._out.get(request_id)
        if o is None:
            return
        if o.plan is None or any(t < o.kv_tokens for t in o.next_token):
            self.abort(request_id, f"prefill ended with KV of {o.next_token} tokens per layer, "
                       f"{o.kv_tokens} expected")
            return
        self._pool.submit(self._close, request_id, o)

    def abort(self, request_id: str, reason: str) -> None:
        o = self._out.pop(request_id, None)
        if o is not None:
            o.failed = True
        self.server.fail(request_id, reason)

    def stats(self, request_id: str) -> dict[str, Any] | None:
        o = self._out.get(request_id)
        if o is None or o.plan is None:
            return None
        return {"choices": list(o.plan.choices), "kv_tokens": o.kv_tokens,
                "predicted_s": o.plan.predicted_s, "meets_budget": o.plan.meets_budget}

    # -- sender thread ----------------------------------------------------------------
    def _codec(self, label: str, layer: int, layers: int, start: int) -> Any:
        from kvtransfer.adaptive import codec_for

        if label.startswith("kvtc"):  # codes keys before RoPE: one codec per position, cheap to make
            return codec_for(label, layer, layers, start)
        key = (label, layer, layers)
        codec = self._codecs.get(key)
        if codec is None:
            codec = self._codecs[key] = codec_for(label, layer, layers)
        return codec

    def _encode(self, request_id: str, o: _Outgoing, layer: int, start: int, piece: torch.Tensor) -> None:
        if o.failed:
            return
        assert o.plan is not None
        label = o.plan.choices[start // o.plan.chunk_tokens]
        try:
            t0 = time.perf_counter()
            data = self._codec(label, layer, o.shape[0], start).encode(piece.unsqueeze(0))
            dt = time.perf_counter() - t0
            self.server.append(request_id, PART.pack(PART_MAGIC, layer, KIND_KV, start, piece.shape[1],
                                                     len(data)) + data)
        except Exception as e:  # noqa: BLE001 - the receiver gets the reason
            logger.exception("encoding KV of %s failed", request_id)
            self.abort(request_id, f"encoding layer {layer} tokens {start}.. with {label} failed: {e!r}")
            return
        if self.on_encoded is not None:
            self.on_encoded(label, piece.numel() * piece.element_size(), len(data), dt)

    def _close(self, request_id: str, o: _Outgoing) -> None:
        if o.failed:
            return
        self.server.append(request_id, b"", last=True)
        self._out.pop(request_id, None)


@dataclass
class Received:
    # KV of the first kv_tokens prompt tokens: [layers, 2, kv_tokens, kv_heads, head_dim].
    kv: torch.Tensor
    # Prompt tokens whose KV was sent; the decode worker recomputes the rest.
    kv_tokens: int
    # Codec label per chunk, as the sender planned.
    choices: list[str]
    # Bytes that crossed the link (last attempt), and attempts made.
    nbytes: int
    attempts: int


def _receive_once(handle: KVHandle, deadline_s: float) -> Received:
    from kvtransfer.base import TORCH_DTYPES
    from kvtransfer.codec import CodecError, decode_any
    from kvtransfer.grpc_transport import fetch_parts

    layers, _, tokens, kvh, hd = handle.shape
    buf = bytearray()
    plan: dict[str, Any] | None = None
    out: torch.Tensor | None = None
    got: np.ndarray | None = None
    nbytes = 0
    for payload in fetch_parts(handle.ref, handle.request_id, deadline_s):
        nbytes += len(payload)
        buf += payload
        pos = 0
        while len(buf) - pos >= PART.size:
            magic, layer, kind, first, n, length = PART.unpack_from(buf, pos)
            if magic != PART_MAGIC:
                raise KVTransferError(f"KV stream of {handle.request_id}: bad part magic {magic!r}")
            if len(buf) - pos - PART.size < length:
                break
            body = bytes(buf[pos + PART.size: pos + PART.size + length])
            pos += PART.size + length
            if kind == KIND_PLAN:
                plan = json.loads(body)
                kv_tokens, c = int(plan["kv_tokens"]), int(plan["chunk_tokens"])
                if not 0 <= kv_tokens <= tokens or c < 1:
                    raise KVTransferError(f"KV stream of {handle.request_id}: bad plan {plan}")
                out = torch.empty(layers, 2, kv_tokens, kvh, hd, dtype=TORCH_DTYPES[handle.dtype])
                got = np.zeros((layers, -(-kv_tokens // c)), dtype=bool)
                continue
            if plan is None or out is None or got is None:
                raise KVTransferError(f"KV stream of {handle.request_id}: KV before the plan")
            c = int(plan["chunk_tokens"])
            if layer >= layers or first % c or first + n > out.shape[2] or n != min(c, out.shape[2] - first):
                raise KVTransferError(f"KV stream of {handle.request_id}: piece layer {layer} tokens "
                                      f"{first}+{n} does not fit {handle.shape} in chunks of {c}")
            if got[layer, first // c]:
                raise KVTransferError(f"KV stream of {handle.request_id}: layer {layer} chunk "
                                      f"{first // c} arrived twice")
            try:
                piece = decode_any(body)
            except CodecError as e:
                raise KVTransferError(f"KV of {handle.request_id} layer {layer} could not be decoded: {e}") from None
            if tuple(piece.shape) != (1, 2, n, kvh, hd):
                raise KVTransferError(f"KV of {handle.request_id} layer {layer} decoded to "
                                      f"{tuple(piece.shape)}, expected {(1, 2, n, kvh, hd)}")
            out[layer, :, first:first + n] = piece[0]
            got[layer, first // c] = True
        del buf[:pos]
    if buf:
        raise KVTransferError(f"KV stream of {handle.request_id} ended inside a part ({len(buf)} bytes left)")
    if plan is None or out is None or got is None:
        raise KVTransferError(f"KV stream of {handle.request_id} ended without a plan")
    if not got.all():
        missing = np.argwhere(~got)[:4].tolist()
        raise KVTransferError(f"KV stream of {handle.request_id} ended with (layer, chunk) pieces "
                              f"missing, e.g. {missing}")
    return Received(out, out.shape[2], list(plan["choices"]), nbytes, 1)


def receive_stream(handle: KVHandle, timeout_s: float, retries: int = 1) -> Received:
    """Fetch, check and decode a streamed transfer; one more try after a failure, within
    the same deadline. Releases the sender's copy either way."""
    from kvtransfer.grpc_transport import release

    deadline = time.monotonic() + timeout_s
    errors: list[str] = []
    try:
        for attempt in range(retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                got = _receive_once(handle, left)
                got.attempts = attempt + 1
                return got
            except KVTransferError as e:
                errors.append(str(e))
                if "sender failed" in str(e):
                    break  # the sender gave up: fetching again cannot help
                logger.warning("KV transfer of %s failed (attempt %d): %s", handle.request_id, attempt + 1, e)
        raise KVTransferError(f"KV transfer of {handle.request_id} failed after {len(errors)} "
                              f"attempt(s): {'; '.join(errors) or 'deadline passed'}")
    finally:
        threading.Thread(target=release, args=(handle.ref, handle.request_id), daemon=True).start()
