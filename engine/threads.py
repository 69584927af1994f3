"""How many torch (OpenMP) threads an engine worker computes with, given the CPUs it
reserved. ``SPLITSERVE_THREADS``:

- ``auto`` (default): one per reserved CPU;
- ``reserve``: one fewer than the reserved CPUs (at least one), leaving a core to the
  worker's own event loop, Ray and the ingress: what vLLM-CPU does by default (it binds
  its OpenMP threads to all cores but one, which it keeps for its scheduler and API
  server; on this 2-core machine it computes with one thread);
- a positive integer: that many.

``SPLITSERVE_THREAD_SCOPE``: ``engine`` (default) gives those threads to the engine thread
alone, every other thread of the worker computing with one (see use_threads below);
``process`` gives them to every thread, as torch.set_num_threads does (what workers did
before session 11).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

ENV = "SPLITSERVE_THREADS"
SCOPE_ENV = "SPLITSERVE_THREAD_SCOPE"
SCOPES = ("engine", "process")


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


def thread_scope() -> str:
    """SPLITSERVE_THREAD_SCOPE: engine (default) or process."""
    raw = os.environ.get(SCOPE_ENV, "engine").strip().lower() or "engine"
    if raw not in SCOPES:
        raise ValueError(f"{SCOPE_ENV}={raw!r}: allowed {', '.join(SCOPES)}")
    return raw


# -- OpenMP threads of one thread, not of the process -------------------------------------
# libgomp keeps its OpenMP workers spinning between parallel regions (~3 ms) only while the
# process has no more OpenMP threads than CPUs; past that it spins ~100 times and sleeps, so
# every parallel region of a step starts with futex wake-ups. torch.set_num_threads sets a
# process-wide count that every thread adopts at its first parallel op, so each thread of a
# worker that touches torch (the actor's, asyncio.to_thread's loading the model, the KV
# sender and importer) grew a team of its own, idle but counted: measured on SmolLM2 with 2
# threads, an engine stepping in a thread beside one other team took ~285 voluntary context
# switches and 3-5 ms of system time per step and stepped 15-20 % slower than alone
# (benchmarks/results/2026-12-06-speed, session 11). Hence: the process-wide count is 1
# (use_threads_everywhere), and the engine thread alone computes with more (use_threads).

_GOMP: Any = None


def _libgomp() -> Any:
    """The libgomp torch runs on (ctypes handle), or False when torch uses another runtime."""
    global _GOMP
    if _GOMP is None:
        _GOMP = False
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
            if len(paths) == 1:
                lib = ctypes.CDLL(paths.pop())
                lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                _GOMP = lib
        except OSError:
            pass
    return _GOMP


def use_threads_everywhere(n: int) -> None:
    """The torch threads every thread of this process computes with unless it says otherwise
    (use_threads): call before any thread has computed."""
    import torch

    torch.set_num_threads(n)


def use_threads(n: int) -> int:
    """Torch computes with ``n`` threads in the calling thread only; other threads keep the
    process-wide count. Returns the count torch now reports for this thread."""
    import torch

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    gomp = _libgomp()
    torch.get_num_threads()  # torch's per-thread set-up, which would overwrite the count below
    if gomp:
        gomp.omp_set_num_threads(n)
    else:  # another OpenMP runtime (or none): the process-wide setter
        torch.set_num_threads(n)
    return int(torch.get_num_threads())
