"""Paged decode attention that reads the cache in place: a numba kernel for fp32 on CPU,
used by pure-decode steps (eager and compiled) and the decode rows of mixed steps.

The gather + SDPA path (engine.attention) copies each sequence's blocks into a contiguous
tensor and runs SDPA over it: the context is read, written and read again per layer, and
SDPA's flash kernel tiles a single query token poorly. This kernel (engine._paged_kernel)
walks each sequence's block table, reads each key and value row once for the query heads
it serves (grouped-query attention), takes a softmax in float32 with the running maximum
subtracted and a vectorised exp, as vLLM's CPU paged attention does with its own kernels.
Results differ from SDPA's by summation order (~1e-7 relative in fp32; greedy outputs of
the real-model tests unchanged).

Measured on SmolLM2 fp32, batch 8 x ~200-token contexts, one thread, inside a decode step
(benchmarks/results/2026-12-06-speed, session 11): ~0.15 ms per layer against ~0.37 for
gather + SDPA. It replaces session 9's C++ kernel, which computed the same thing in
0.86 ms per layer (a division per position, a scalar exp) and needed a compiler at run
time.

``SPLITSERVE_PAGED_KERNEL``: ``auto`` (default) and ``1``: the kernel wherever it applies
(fp32 cache on CPU, numba importable); ``0``: never (gather + SDPA).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV = "SPLITSERVE_PAGED_KERNEL"
MODES = ("auto", "1", "0")


def kernel_mode() -> str:
    """SPLITSERVE_PAGED_KERNEL: auto or 1 (the kernel where it applies), 0 (never)."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: allowed {', '.join(MODES)}")
    return mode


def wanted(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether decode attention over a cache of this dtype and device uses the kernel."""
    if dtype != torch.float32 or torch.device(device).type != "cpu" or kernel_mode() == "0":
        return False
    return kernel() is not None


_lock = threading.Lock()
_kernel: Any = None
_failed: str | None = None


def kernel() -> Any:
    """The compiled kernel (numba's on-disk cache after the first build), or None when
    numba cannot build it here."""
    global _kernel, _failed
    if _kernel is not None or _failed is not None:
        return _kernel
    with _lock:
        if _kernel is None and _failed is None:
            try:
                import numpy as np

                from engine._paged_kernel import decode

                # Compile (or load from numba's cache) now, on the argument types used.
                q = np.zeros((1, 2, 4), np.float32)
                kv = np.zeros((1, 2, 1, 4), np.float32)
                decode(q, kv, kv, np.zeros((1, 1), np.int64), np.ones(1, np.int64), 0.5, 0, np.empty_like(q))
                _kernel = decode
            except Exception as e:  # noqa: BLE001 - numba missing or failing: gather + SDPA stays
                _failed = f"{type(e).__name__}: {e}"
                logger.warning("paged decode kernel unavailable, using gather + SDPA: %s", _failed[:500])
    return _kernel


def decode_tables(tables: list[list[int]], context_lens: list[int], block_size: int) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """A decode batch's block tables, padded to one width (int64 [B, W]), and its context
    lengths (int64 [B]): the same for every layer of a step."""
    used = [t[: -(-c // block_size)] for t, c in zip(tables, context_lens)]
    width = max(len(t) for t in used)
    return (torch.tensor([t + [0] * (width - len(t)) for t in used], dtype=torch.long),
            torch.tensor(context_lens, dtype=torch.long))


def paged_decode(q: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, scale: float,
                 window: int | None) -> torch.Tensor:
    """q [B, heads, hd] (one query per sequence, at position lens[b] - 1); cache [2, blocks,
    block_size, kv_heads, hd] fp32 contiguous; table [B, W], lens [B] (decode_tables) ->
    [B, heads, hd]. Needs kernel()."""
    fn = kernel()
    if fn is None:
        raise RuntimeError(f"paged decode kernel unavailable: {_failed}")
    if not cache.is_contiguous():
        raise ValueError("paged_decode needs a contiguous cache [2, blocks, block_size, kv_heads, head_dim]")
    qc = q.contiguous()
    out = torch.empty_like(qc)
    fn(qc.numpy(), cache[0].numpy(), cache[1].numpy(), table.numpy(), lens.numpy(), scale, window or 0,
       out.numpy())
    return out
