"""Health checks tell a worker starved of CPU from a dead or hung one (cluster/liveness.py):
a decode worker throttled to a sliver of a core (a CPU cgroup, as at load 60+ on a
shared machine) goes longer without answering than the old fixed bound (3 missed checks
of 5 s) and is kept, then serves; a stopped (SIGSTOP) worker is replaced, as a killed one
is (test_failures.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray

from cluster.liveness import HEALTH_TIMEOUT_S, MISSES_BEFORE_REPLACE

from .conftest import manifest_for, serving
from .test_failures import wait_replaced, workers

CPU_CGROUP = Path("/sys/fs/cgroup/cpu")  # cgroup v1 CPU controller (this machine's)


def can_throttle() -> bool:
    return (CPU_CGROUP / "cpu.cfs_quota_us").exists() and os.access(CPU_CGROUP, os.W_OK)


@contextlib.contextmanager
def throttled(pid: int, quota_us: int, period_us: int = 1_000_000):
    """Every thread of process ``pid`` gets at most quota_us of CPU per period_us."""
    group = CPU_CGROUP / f"splitserve-test-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(period_us))
        (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        with contextlib.suppress(OSError):
            (group / "cpu.cfs_quota_us").write_text("-1")
        for _ in range(50):  # back to the root group (thread by thread: new threads too)
            try:
                tids = (group / "tasks").read_text().split()
            except OSError:
                break
            for tid in tids:
                with contextlib.suppress(OSError):
                    (CPU_CGROUP / "tasks").write_text(tid)
            if not tids:
                break
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def entry(dep, pool: str, worker_id: str) -> dict | None:
    return next((w for w in workers(dep, pool) if w["worker_id"] == worker_id), None)


@pytest.mark.skipif(not can_throttle(), reason="needs a writable cgroup v1 CPU controller (root)")
def test_starved_worker_is_kept_and_serves(ray_session, llama_dir):
    body = {"model": "tiny", "prompt": "starved but alive", "max_tokens": 8, "temperature": 0}
    with serving(manifest_for(llama_dir)) as (url, dep):
        expected = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        w = workers(dep, "decode")[0]
        wid, pid = w["worker_id"], w["stats"]["pid"]
        replacements = ray.get(dep.controller.get_state.remote(), timeout=10)["replacements"]
        window = HEALTH_TIMEOUT_S * MISSES_BEFORE_REPLACE
        # Busy and starved, as at load 60+: a long request keeps its engine thread stepping
        # while the whole process gets 0.1 % of a core (1 ms per second), so the health
        # call waits for the GIL behind steps that each take seconds of wall time; the
        # throttle lasts well past the old bound.
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    httpx.post(f"{url}/v1/completions", timeout=120,
                               json={**body, "max_tokens": 400, "ignore_eos": True})

        loader = threading.Thread(target=busy, daemon=True)
        loader.start()
        time.sleep(1.0)
        with throttled(pid, 1000):
            deadline = time.monotonic() + window + 20
            while time.monotonic() < deadline:
                e = entry(dep, "decode", wid)
                assert e is not None, f"the starved worker {wid} was replaced"
                time.sleep(1.0)
        stop.set()
        loader.join(timeout=180)
        # Answers again: the same worker, which went longer than the old bound silent.
        deadline = time.monotonic() + 60
        while True:
            e = entry(dep, "decode", wid)
            assert e is not None, f"{wid} was replaced after the throttle"
            # Answered nothing within HEALTH_TIMEOUT_S for longer than 3 x 5 s in a row: the
            # old fixed policy (3 calls timed out) replaced it.
            if e["health_late_s"] > window and e["health_rtt_s"] and e["health_rtt_s"][-1] < 2.0:
                break
            assert time.monotonic() < deadline, {k: e[k] for k in ("health_late_s", "health_silence_s",
                                                                   "health_rtt_s", "healthy")}
            time.sleep(0.5)
        print(f"{wid} answered nothing within {HEALTH_TIMEOUT_S:.0f}s for {e['health_late_s']:.1f}s "
              f"(old bound {window:.0f}s; longest silence {e['health_silence_s']:.1f}s); "
              f"recent answers {[round(r, 2) for r in e['health_rtt_s']]}")
        state = ray.get(dep.controller.get_state.remote(), timeout=10)
        assert state["replacements"] == replacements
        assert e["healthy"] and e["stats"]["pid"] == pid
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected


def test_stopped_worker_is_replaced(ray_session, llama_dir):
    body = {"model": "tiny", "prompt": "after the stop", "max_tokens": 8, "temperature": 0}
    with serving(manifest_for(llama_dir)) as (url, dep):
        expected = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        w = workers(dep, "decode")[0]
        os.kill(w["stats"]["pid"], signal.SIGSTOP)  # alive, but will never answer
        try:
            new = wait_replaced(dep, "decode", w["worker_id"], timeout_s=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w["stats"]["pid"], signal.SIGCONT)
        assert new != w["worker_id"]
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
