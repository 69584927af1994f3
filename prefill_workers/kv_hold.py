"""What a prefill worker holds of its requests' KV after the prompt is computed: the
same-node arena it gathers into, the transfers it pushed or keeps for the ingress to take,
and their release (the request ended; no receiver will read it) - each freed at once or
at its TTL, never held for good."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from engine.engine import LLMEngine
from kvtransfer.connector import GrpcConnector, KVHandle, KVTransferError

logger = logging.getLogger("prefill_workers.worker")


class KVHoldMixin:
    """PrefillWorker's KV holding; the worker sets these in its __init__ and start."""

    worker_id: str
    manifest: Any
    settings: Any
    engine: Any
    connector: Any
    _kv_shape: tuple[int, int, int]
    _probe: str | None
    _dest: dict[str, str | None]
    _streams: dict[str, KVHandle]
    _held: dict[str, tuple[KVHandle, float]]
    _kv_taken: int

    def _start_arena(self) -> None:
        """The same-node KV arena: kv_transfer.shm_arena_mb, else as large as this pool's KV
        cache. Without one (0, transport object_store or grpc, or /dev/shm refused) KV
        within a node goes through the object store."""
        from kvtransfer.shm import ShmArena, arena_bytes

        kt = self.manifest.kv_transfer
        if kt.transport not in ("auto", "shm") or kt.shm_arena_mb == 0 or self.connector.shm.arena is not None:
            return
        layers, kvh, hd = self._kv_shape
        size = (int(kt.shm_arena_mb * 2**20) if kt.shm_arena_mb is not None else
                arena_bytes(layers, kvh, hd, self.manifest.model.dtype,
                            self.settings.num_blocks * self.settings.block_size))
        try:
            self.connector.shm.arena = ShmArena(size, ttl_s=kt.timeout_s + self.manifest.server.request_timeout_s)
        except (OSError, ValueError) as e:
            logger.warning("%s has no shared-memory KV arena (%s); same-node KV goes through the object store",
                           self.worker_id, e)
            return
        arena = self.connector.shm.arena
        if isinstance(self.engine, LLMEngine):  # splitserve's engine (vLLM's exports its own way)
            # Prompt KV is gathered out of the paged cache straight into an arena slot (the
            # sender's one copy), except the codec-profiling probe's and when it is full.
            def export_into(rid: str, shape: tuple[int, ...], dtype: Any) -> Any:
                if rid == self._probe or self.connector.pick(self._dest.get(rid)) is not self.connector.shm:
                    return None
                return arena.buffer(rid, shape, dtype)

            self.engine.runner.export_into = export_into
            self.engine.runner.export_sums = arena.set_sums  # checksums computed in the gather
        logger.info("%s KV arena: %.0f MiB", self.worker_id, size / 2**20)

    def _drop_kv(self, handle: KVHandle) -> None:
        """Free what this worker published of a transfer no one will read (no arena slot
        is then held until its TTL)."""
        arena = self.connector.shm.arena
        if arena is not None and handle.transport == "shm" and handle.ref is not None:
            arena.discard(handle.request_id, handle.ref.generation)

    async def _push_kv(self, decode: Any, handle: KVHandle) -> None:
        """Hand a published transfer to its decode worker (``prefetch_kv``). If that worker
        is gone, no one reads the KV (the ingress resumes the request elsewhere from the
        prompt): its arena slot is freed now rather than at its TTL."""
        try:
            await asyncio.wait_for(decode.prefetch_kv.remote(handle), timeout=self.manifest.kv_transfer.timeout_s)
        except asyncio.TimeoutError:
            pass  # slow, not gone: read, released by the ingress, or freed at the TTL
        except Exception as e:  # noqa: BLE001 - the decode worker died
            logger.info("%s: decode worker gone before it took the KV of %s (%s); freeing it", self.worker_id,
                        handle.request_id, type(e).__name__)
            self._drop_kv(handle)

    def _sweep_held(self) -> None:
        horizon = time.monotonic() - self.manifest.kv_transfer.timeout_s - self.manifest.server.request_timeout_s
        for rid in [r for r, (_, t) in self._held.items() if t < horizon]:
            del self._held[rid]

    async def take_kv(self, request_id: str) -> KVHandle:
        """The KV handle (with its object ref) of a prefill that came over a channel."""
        entry = self._held.pop(request_id, None)
        if entry is None:
            raise KVTransferError(f"{self.worker_id} holds no KV of {request_id}")
        self._kv_taken += 1
        return entry[0]

    async def kv_arena_slots(self) -> list[dict[str, Any]]:
        """The arena's held slots (kvtransfer.shm.ShmArena.slots): debugging, tests."""
        arena = self.connector.shm.arena
        return [] if arena is None else arena.slots()

    async def release_kv(self, request_id: str) -> None:
        """Drop what this worker holds of a request's KV transfer: the request ended (done,
        failed, aborted) and no receiver will fetch it. Idempotent."""
        server = GrpcConnector._server
        if self._streams.pop(request_id, None) is not None:
            self.connector.grpc.sender.abort(request_id, f"{request_id} was released")
        if server is not None:
            server.discard(request_id)
        if self.connector.shm.arena is not None:
            self.connector.shm.arena.release(request_id)  # freed now, or once its reader is out

