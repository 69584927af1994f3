"""The controller's liveness verdicts (cluster/liveness.py) on real processes: a process
that runs (busy, as a CPU-starved worker's threads are) is slow, not hung, until the
longest silence allowed; a stopped (SIGSTOP) or blocked one is hung once the window ends; a
dead one (gone or a zombie) is dead at once; the window grows with measured answers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from cluster import liveness
from cluster.liveness import Liveness

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def spawn(code: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)  # started
    return p


def identity(p: subprocess.Popen, tids: bool = False) -> dict:
    st = liveness._stat(f"/proc/{p.pid}/stat")
    assert st is not None
    return {"host_id": liveness.host_id(), "pid": p.pid, "proc_start": st[2],
            "loop_tid": p.pid if tids else None}


def waiting(stats: dict, base: float = 0.3, max_silence: float = 30.0) -> Liveness:
    """A Liveness whose health call was sent now and is not answered."""
    live = Liveness(base_window_s=base, max_silence_s=max_silence)
    live.observe(stats)
    live.sent(None, time.monotonic())  # type: ignore[arg-type]
    return live


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait(timeout=10)


@pytest.mark.parametrize("tids", [False, True])
def test_running_process_is_slow_not_hung(procs, tids):
    p = spawn("while True: pass")
    procs.append(p)
    live = waiting(identity(p, tids))
    assert live.verdict(time.monotonic())[0] == "ok"  # within the window
    time.sleep(0.5)
    verdict, why = live.verdict(time.monotonic())
    assert verdict == "slow", why
    live.max_silence_s = 0.5
    assert live.verdict(time.monotonic())[0] == "hung"  # no answer at all for too long


def test_stopped_process_is_hung_after_the_window(procs):
    p = spawn("while True: pass")
    procs.append(p)
    p.send_signal(signal.SIGSTOP)
    time.sleep(0.2)
    live = waiting(identity(p, tids=True))
    assert live.verdict(time.monotonic())[0] == "ok"
    time.sleep(0.5)
    verdict, why = live.verdict(time.monotonic())
    assert verdict == "hung" and "no CPU" in why, why


def test_blocked_process_is_hung(procs):
    p = spawn("import threading; threading.Event().wait()")  # blocked forever, uses no CPU
    procs.append(p)
    live = waiting(identity(p, tids=True))
    time.sleep(0.5)
    assert live.verdict(time.monotonic())[0] == "hung"


def test_dead_process_is_dead_at_once(procs):
    p = spawn("import time; time.sleep(60)")
    procs.append(p)
    live = waiting(identity(p), base=60)
    assert live.verdict(time.monotonic())[0] == "ok"
    p.kill()
    time.sleep(0.2)  # a zombie until reaped
    assert live.verdict(time.monotonic())[0] == "dead"
    p.wait(timeout=10)
    assert live.verdict(time.monotonic())[0] == "dead"  # gone


def test_another_process_under_the_same_pid_is_not_it(procs):
    p = spawn("import time; time.sleep(60)")
    procs.append(p)
    stats = identity(p)
    stats["proc_start"] -= 1  # as if the pid had been reused since
    assert waiting(stats, base=60).verdict(time.monotonic())[0] == "dead"


def test_window_scales_with_measured_answers(procs):
    p = spawn("import threading; threading.Event().wait()")
    procs.append(p)
    stats = identity(p, tids=True)
    live = waiting(stats)
    live.sent_at -= 2.0
    live.answered(time.monotonic(), stats)  # the last answer took 2 s
    assert live.window() == pytest.approx(liveness.SLOW_FACTOR * 2.0, rel=0.05)
    live.sent(None, time.monotonic())  # type: ignore[arg-type]
    time.sleep(0.5)
    assert live.verdict(time.monotonic())[0] == "ok"  # silent past the base window, within 3 x 2 s
    live.sent_at -= 6.0
    assert live.verdict(time.monotonic())[0] == "hung"


def test_other_host_is_judged_by_the_window_alone(procs):
    p = spawn("while True: pass")
    procs.append(p)
    stats = {**identity(p), "host_id": "another-kernel"}
    live = waiting(stats)
    assert live.pid is None  # its /proc is not ours to read
    time.sleep(0.5)
    verdict, why = live.verdict(time.monotonic())
    assert verdict == "hung" and "not on this host" in why


def test_late_answers_in_a_row_add_up():
    live = Liveness()
    for rtt in (7.0, 8.0, 0.1, 6.0):
        live.sent(None, 100.0)  # type: ignore[arg-type]
        live.answered(100.0 + rtt, {})
    assert live.longest_late_s == pytest.approx(15.0)  # 7 + 8; the fast answer ended the run
    live.sent(None, 200.0)  # type: ignore[arg-type]
    live.verdict(212.0)  # silent 12 s after the late 6 s answer
    assert live.longest_late_s == pytest.approx(18.0)
