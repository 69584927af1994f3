"""How many torch (OpenMP) threads an engine worker computes with, given the CPUs it
reserved. ``SPLITSERVE_THREADS``:

- ``auto`` (default): one per reserved CPU;
- ``reserve``: one fewer than the reserved CPUs (at least one), leaving a core to the
  worker's own event loop, Ray and the ingress: what vLLM-CPU does by default (it binds
  its OpenMP threads to all cores but one, which it keeps for its scheduler and API
  server; on this 2-core machine it computes with one thread);
- a positive integer: that many.
"""

from __future__ import annotations

import os

ENV = "SPLITSERVE_THREADS"


def compute_threads(num_cpus: float) -> int:
    cpus = max(1, int(num_cpus))
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if raw == "auto":
        return cpus
    if raw == "reserve":
        return max(1, cpus - 1)
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={raw!r}: allowed auto, reserve or a positive integer")
    return n
