"""Torch threads scoped to the engine thread (engine.threads.use_threads,
SPLITSERVE_THREAD_SCOPE): the count is per thread, and with it the engine thread's
OpenMP workers stay awake between parallel regions while other threads of the process
also compute. Each case runs in a fresh interpreter (thread counts are process state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.threads import thread_scope

ROOT = Path(__file__).resolve().parents[2]

# The worker's pattern: the process-wide count first, another thread computes (loading,
# a KV copy), then the engine thread computes with 2 in many short parallel regions.
SCRIPT = r"""
import json, resource, sys, threading, torch
from engine.threads import use_threads, use_threads_everywhere
scope = sys.argv[1]
use_threads_everywhere(1 if scope == "engine" else 2)
seen = {}
def other():  # stays alive, as the worker's executor threads do
    seen["other"] = torch.get_num_threads()
    torch.randn(3000, 3000).add_(1.0)
    done.wait(60)
done = threading.Event()
t = threading.Thread(target=other, daemon=True); t.start()
def engine():
    seen["engine"] = use_threads(2) if scope == "engine" else torch.get_num_threads()
    x = torch.randn(64, 4096)
    for _ in range(20):
        x.mul(1.0001)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(300):
        x.mul(1.0001)  # 262k elements: one parallel region each
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    seen["switches"] = r1.ru_nvcsw - r0.ru_nvcsw
e = threading.Thread(target=engine); e.start(); e.join(60)
def late():
    seen["late"] = torch.get_num_threads()
l = threading.Thread(target=late); l.start(); l.join(60)
seen["main"] = torch.get_num_threads()
done.set()
print(json.dumps(seen))
"""


def _run(scope: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-c", SCRIPT, scope], capture_output=True, text=True, timeout=120,
                       env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_counts_are_per_thread() -> None:
    seen = _run("engine")
    assert (seen["engine"], seen["other"], seen["late"], seen["main"]) == (2, 1, 1, 1)
    seen = _run("process")
    assert (seen["engine"], seen["other"], seen["late"], seen["main"]) == (2, 2, 2, 2)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for a team of 2")
def test_engine_scope_keeps_the_workers_awake() -> None:
    # With another thread's team alive (process scope), libgomp's workers sleep after ~100
    # spins, so each of the 300 regions wakes one with a futex: ~300 voluntary switches.
    # Engine-scoped, only the engine thread has a team and its worker spins between regions.
    engine, process = _run("engine")["switches"], _run("process")["switches"]
    assert process >= 150, process
    assert engine * 4 < process, (engine, process)


def test_scope_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_THREAD_SCOPE", raising=False)
    assert thread_scope() == "engine"
    monkeypatch.setenv("SPLITSERVE_THREAD_SCOPE", "Process")
    assert thread_scope() == "process"
    monkeypatch.setenv("SPLITSERVE_THREAD_SCOPE", "all")
    with pytest.raises(ValueError, match="SPLITSERVE_THREAD_SCOPE='all': allowed engine, process"):
        thread_scope()
