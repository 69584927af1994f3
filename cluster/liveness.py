"""Worker liveness for the controller: dead, hung, or only slow.

A fixed health-call timeout cannot tell a worker that is starved of CPU (load 60+ on a
shared machine: every call answers, but late) from one that will never answer again; the
controller used to replace both after 3 missed calls of 5 s. Here three kinds of evidence
are combined:

- **Dead** (replaced at once): Ray reports the actor died (the health call raises a
  ``RayError``: the process exited, was killed, or its node is gone); or, where the
  worker's process is on this host (same kernel boot id), its pid is gone, a zombie, or
  another process (start time differs).
- **Answering late** (kept): a health call is never abandoned: one call per worker is in
  flight at a time, and a late answer is an answer (the old timeout cancelled it and
  counted a miss). The window a worker may stay silent scales with its measured response
  times (``SLOW_FACTOR`` x the slowest of the recent answers, at least
  ``HEALTH_TIMEOUT_S`` x ``MISSES_BEFORE_REPLACE``, 15 s, the old bound).
- **Running, not stuck** (kept up to ``MAX_SILENCE_S``): past that window, a worker whose
  process is on this host and whose own threads (the event loop, where health is
  answered, and the engine thread) used CPU since the call was sent is
  slow, not hung; so is one with any thread runnable (a starved process's threads wait
  for a core, or are throttled, in state R). A stopped (SIGSTOP), deadlocked or blocked
  worker has no runnable thread and its threads use no CPU: it is replaced when the
  window ends, as before. On another host, the window
  alone decides.

No wall-clock promise is made for a worker whose threads spin without ever answering: it
is replaced after ``MAX_SILENCE_S``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

HEALTH_TIMEOUT_S = 5.0  # one check's wait for the outstanding call (a miss after it)
MISSES_BEFORE_REPLACE = 3  # the base silence window: 3 x 5 s
SLOW_FACTOR = 3.0  # the window is at least 3 x the slowest of the recent answers
RECENT = 8  # answers the window looks back on
MAX_SILENCE_S = 120.0  # a running worker that answers nothing this long is replaced


@functools.cache
def host_id() -> str:
    """This kernel's boot id: two processes with the same one can see each other's /proc."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat(path: str) -> tuple[str, int, int] | None:
    """(state, utime + stime in ticks, start time in ticks) from a /proc .../stat file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    # fields[0] is field 3 (state); utime, stime: fields 14, 15; starttime: field 22.
    return fields[0], int(fields[11]) + int(fields[12]), int(fields[19])


def process_identity() -> dict[str, Any]:
    """What a worker reports so that the controller can watch its process: host, pid,
    start time, and the threads whose progress means it is alive (this thread, the event
    loop where health is answered, plus ``engine_tid``)."""
    st = _stat("/proc/self/stat")
    return {"host_id": host_id(), "pid": os.getpid(), "proc_start": st[2] if st else None,
            "loop_tid": threading.get_native_id()}


@dataclass
class ProcSample:
    exists: bool  # the same process (pid and start time) is there and not a zombie
    cpu_ticks: int  # CPU time of the watched threads
    running: bool  # one of them is runnable right now


def sample(pid: int, start: int | None, tids: list[int], runnable: bool = True) -> ProcSample:
    """CPU time of the watched threads (the whole process's if none is known), and
    whether any thread of the process is runnable now (a starved process has runnable
    threads waiting for a core, or throttled; a stopped, blocked or deadlocked one has
    none, or only for the instant a background thread wakes)."""
    st = _stat(f"/proc/{pid}/stat")
    if st is None or st[0] in ("Z", "X", "x") or (start is not None and st[2] != start):
        return ProcSample(False, 0, False)
    ticks, seen = 0, 0
    for tid in tids:
        t = _stat(f"/proc/{pid}/task/{tid}/stat")
        if t is not None:
            seen += 1
            ticks += t[1]
    if not seen:  # threads unknown or gone: the whole process
        ticks = st[1]
    running = False
    try:
        for tid in os.listdir(f"/proc/{pid}/task") if runnable else ():
            t = _stat(f"/proc/{pid}/task/{tid}/stat")
            if t is not None and t[0] == "R":
                running = True
                break
    except OSError:
        pass
    return ProcSample(True, ticks, running)


@dataclass
class Liveness:
    """The controller's view of one worker's liveness (see the module doc)."""

    base_window_s: float = HEALTH_TIMEOUT_S * MISSES_BEFORE_REPLACE
    max_silence_s: float = MAX_SILENCE_S
    rtts: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    call: asyncio.Future[Any] | None = None  # the health call in flight
    sent_at: float = 0.0
    # Where its process is, when on this host: pid, start time, watched threads.
    pid: int | None = None
    start: int | None = None
    tids: list[int] = field(default_factory=list)
    ticks_at_send: int | None = None
    slow_reported: bool = False
    # The longest it went without answering (a late answer's time, or a silence seen).
    longest_silence_s: float = 0.0
    answers: int = 0  # health answers received
    # The longest run of time it answered nothing within HEALTH_TIMEOUT_S (consecutive
    # late answers, plus a silence seen): the old fixed policy replaced a worker once this
    # reached 3 x 5 s.
    longest_late_s: float = 0.0
    _late_run_s: float = 0.0

    def observe(self, stats: dict[str, Any]) -> None:
        """Take the process identity from a health answer (only on this host)."""
        if stats.get("host_id") and stats["host_id"] == host_id() and stats.get("pid"):
            self.pid, self.start = int(stats["pid"]), stats.get("proc_start")
            self.tids = [int(t) for t in (stats.get("loop_tid"), stats.get("engine_tid")) if t]

    def sent(self, call: asyncio.Future[Any], now: float) -> None:
        self.call, self.sent_at = call, now
        s = None if self.pid is None else sample(self.pid, self.start, self.tids, runnable=False)
        self.ticks_at_send = s.cpu_ticks if s is not None else None

    def answered(self, now: float, stats: dict[str, Any]) -> None:
        self.rtts.append(now - self.sent_at)
        self.answers += 1
        rtt = now - self.sent_at
        self._late_run_s = self._late_run_s + rtt if rtt > HEALTH_TIMEOUT_S else 0.0
        self.longest_late_s = max(self.longest_late_s, self._late_run_s)
        self.longest_silence_s = max(self.longest_silence_s, now - self.sent_at)
        self.call = None
        self.slow_reported = False
        self.observe(stats)

    def sample(self) -> ProcSample | None:
        return None if self.pid is None else sample(self.pid, self.start, self.tids)

    def window(self) -> float:
        return max(self.base_window_s, SLOW_FACTOR * max(self.rtts, default=0.0))

    def verdict(self, now: float) -> tuple[str, str]:
        """("ok" | "slow" | "hung" | "dead", why) while a health call is unanswered."""
        silent = now - self.sent_at
        self.longest_silence_s = max(self.longest_silence_s, silent)
        if silent > HEALTH_TIMEOUT_S:
            self.longest_late_s = max(self.longest_late_s, self._late_run_s + silent)
        s = self.sample()
        if s is not None and not s.exists:
            return "dead", f"its process {self.pid} is gone"
        if silent < self.window():
            return "ok", ""
        if silent >= self.max_silence_s:
            return "hung", f"no health answer for {silent:.0f}s (at most {self.max_silence_s:.0f}s)"
        if s is not None and (s.running or (self.ticks_at_send is not None and s.cpu_ticks > self.ticks_at_send)):
            return "slow", f"no health answer for {silent:.0f}s, but its threads run (starved of CPU?)"
        where = "its threads use no CPU" if s is not None else "not on this host"
        return "hung", f"no health answer for {silent:.0f}s ({where}; window {self.window():.0f}s)"

