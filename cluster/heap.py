"""Garbage-collector pauses off the serving path.

A serving process (ingress or worker) holds a large heap that lives for the whole process:
Ray's, torch's, FastAPI's and the tokenizer's objects, the model's modules. CPython's full
(generation 2) collection walks all of it; measured in the ingress during a 300-request
burst: 134-189 ms per full collection, one every few bursts, each a stall of the event
loop (every admitted request's first token waited behind it: the bimodal rounds of
``benchmarks/burst.py``). ``gc.freeze()`` moves everything alive at the end of start-up
into a permanent generation that collections skip, so later full collections walk only
what serving allocated since (the technique Instagram described for its Django servers).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_heap(who: str) -> None:
    """Collect once, then freeze what survives; call when start-up is done."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("%s: start-up heap frozen (%d objects, %.0f ms)", who, gc.get_freeze_count(),
                (time.perf_counter() - t0) * 1e3)
