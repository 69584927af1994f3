"""Torch threads chosen per engine step: all reserved CPUs for steps that carry prompt
tokens, fewer for pure decode steps. ``SPLITSERVE_DECODE_THREADS``:

- unset or ``same`` (default): every step uses the worker's threads (engine.threads);
- ``reserve``: pure decode steps use one thread fewer (at least one);
- a positive integer: pure decode steps use that many (at most the worker's threads).

Why (session 10, benchmarks/results/2026-12-06-speed): a colocated worker with 2 CPUs
prefills 1.4x faster per token on 2 threads than on 1, but its served batch-8 decode step
is no faster on 2 (70-72 ms vs 68-74 ms): the ingress, Ray and the worker's own event loop
preempt one of the two OpenMP threads now and then, and the other waits at the barrier.
One thread for decode steps leaves them the second core.

``engine.threads.use_threads`` changes the OpenMP thread count of the calling thread only
(libgomp's per-thread ICV), so the engine thread calls ``apply`` itself, before each step.
"""

from __future__ import annotations

import os

from engine.threads import use_threads

ENV = "SPLITSERVE_DECODE_THREADS"


def decode_threads(threads: int) -> int:
    """Threads for pure decode steps of a worker computing with ``threads``."""
    raw = os.environ.get(ENV, "same").strip().lower() or "same"
    if raw == "same":
        return threads
    if raw == "reserve":
        return max(1, threads - 1)
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={raw!r}: allowed same, reserve or a positive integer")
    return min(n, threads)


class StepThreads:
    """Sets the engine thread's torch threads for each step: ``prefill`` threads when the
    step computes any prompt chunk (a query of more than one token), else ``decode``."""

    def __init__(self, prefill: int, decode: int) -> None:
        if prefill < 1 or decode < 1:
            raise ValueError(f"threads must be >= 1, got prefill={prefill} decode={decode}")
        self.prefill, self.decode = prefill, decode
        self.current: int | None = None
        self.switches = 0

    @classmethod
    def for_worker(cls, threads: int) -> StepThreads | None:
        """The policy of a worker computing with ``threads`` (None: nothing to switch)."""
        d = decode_threads(threads)
        return None if d == threads else cls(threads, d)

    def want(self, num_tokens: list[int]) -> int:
        return self.prefill if any(n > 1 for n in num_tokens) else self.decode

    def apply(self, num_tokens: list[int]) -> int:
        """Call on the thread that runs the step, with the step's tokens per sequence."""
        n = self.want(num_tokens)
        if n != self.current:
            use_threads(n)
            self.current = n
            self.switches += 1
        return n
