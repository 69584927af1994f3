"""Admitting a request's prompt KV without stalling the running batch.

The engine thread never copies an arriving request's KV: the decode worker reserves the
request's blocks (``LLMEngine.reserve``: bookkeeping under the engine's lock, no tensor),
writes the KV into them from a pool thread while steps go on (``ModelRunner.write_kv``:
numpy row copies that release the GIL; for same-node transfers straight out of the
prefill worker's shared-memory arena, so that is the only copy on this side), and only
then queues the request, whose prompt is already computed.

Where that cannot be done, the KV goes to the engine with the request as before
(``pending_kv``, written in on the engine thread before its next step): an engine without
reservations (vLLM, tensor-parallel workers), no free blocks right now, requests already
waiting (first come, first served), or nothing to write.

Blocks being written are never given back while the writer runs: a cancelled or failed
admission releases them only once its writer thread has stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kvtransfer.connector import KVHandle, PairConnector

logger = logging.getLogger(__name__)


async def _write_off_thread(engine: Any, request_id: str, fn: Callable[[], Any]) -> Any:
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, fn)
    try:
        return await asyncio.shield(fut)
    except BaseException:
        if fut.done():
            engine.release_reservation(request_id)
        else:  # cancelled while the writer runs: its blocks go back once it stopped
            fut.add_done_callback(lambda _: engine.release_reservation(request_id))
        raise


def _reserve(engine: Any, request_id: str, item: dict[str, Any], kv_tokens: int) -> list[int] | None:
    if kv_tokens <= 0:
        return None
    return engine.reserve(request_id, item["prompt_token_ids"], item["sampling"], item.get("output_token_ids"),
                          kv_tokens)  # type: ignore[no-any-return]


async def receive_and_admit(engine: Any, connector: PairConnector, request_id: str, item: dict[str, Any],
                            handle: KVHandle, timeout_s: float, can_reserve: bool,
                            received: "asyncio.Future[Any] | None" = None) -> Any:
    """Receive ``handle``'s KV and make ``item`` (the request as queued for the engine)
    carry it: ``item["reserved"] = True`` when the KV is already in reserved blocks, else
    ``item["kv"]`` for the engine thread to write in. ``received``: a transfer already
    under way (a prefetch). Returns the ``kvtransfer.stream.Received`` record."""
    from engine.sequence import SamplingParams

    item["sampling"] = SamplingParams(**item["params"])
    try:
        if handle.transport == "shm" and received is None and can_reserve:
            table = _reserve(engine, request_id, item, handle.shape[2])
            if table is not None:
                runner = engine.runner
                blocks = np.asarray(table, dtype=np.int64)  # once, not per piece

                def write(layer: int, j: int, first: int, kv: Any) -> int | None:
                    # The checksum comes out of the scatter's own loop where it can.
                    return runner.write_kv(blocks, layer, first, kv, j, checksum=True)  # type: ignore[no-any-return]

                got = await _write_off_thread(engine, request_id,
                                              lambda: connector.receive_into(handle, write, timeout_s))
                item["reserved"] = True
                return got
        if received is None:
            received = asyncio.ensure_future(asyncio.to_thread(connector.receive_detailed, handle, timeout_s))
        got = await asyncio.wait_for(asyncio.shield(received), timeout=timeout_s)
        table = _reserve(engine, request_id, item, got.kv.shape[2]) if can_reserve else None
        if table is None:
            item["kv"] = got.kv
            return got
        kv = got.kv
        await _write_off_thread(engine, request_id, lambda: engine.runner.import_kv(table, kv))
        item["reserved"] = True
        return got
    finally:
        item.pop("sampling", None)
