"""Network faults on a real link between two Linux network namespaces (issue 16), for the
KV gRPC transport: the sender (``KVServer``) runs in one namespace, the receiver
(``fetch_parts``) in another, over a veth pair with addresses that exist only inside them.

Ray's fake nodes all share the host's network namespace (their raylets, object stores and
workers talk over 127.0.0.x), so a Ray node cannot be put behind its own link here; the
transport's sender/receiver pair is tested across namespaces directly, over real gRPC.
This kernel has no ``netem`` (no added delay or random loss) and no tc classifiers or
actions; it has ``tbf``, so the link is shaped to a slow rate (queueing delay), and a
partition is the link taken down mid-transfer (packets vanish, no reset), which is what a
cut cable or a dead switch looks like to TCP.

What must hold: over the slow link the bytes arrive intact; across a partition the
receiver ends with a ``KVTransferError`` naming the deadline (never a hang, never partial
bytes taken as KV; the decode worker then computes the prompt itself, tested in
test_multinode.py), the sender drops the unreleased parts when they expire (no leak), and
once the link is back the same server serves again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns_kv_peer import payload

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"ssprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot create network namespaces: {e}"
    return None


pytestmark = pytest.mark.skipif(bool(_netns_usable()), reason=_netns_usable() or "")


class Link:
    """Two namespaces joined by a veth pair: sender SEND_IP in ns_a, receiver in ns_b."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns_a, self.ns_b = f"ssa-{tag}", f"ssb-{tag}"
        self.dev_a, self.dev_b = f"va{tag}", f"vb{tag}"
        # Addresses only inside these namespaces (not on any host interface).
        self.ip_a, self.ip_b = "10.213.7.1", "10.213.7.2"

    def up(self) -> None:
        _run("ip", "netns", "add", self.ns_a)
        _run("ip", "netns", "add", self.ns_b)
        _run("ip", "link", "add", self.dev_a, "netns", self.ns_a, "type", "veth", "peer", "name", self.dev_b,
             "netns", self.ns_b)
        for ns, dev, ip in ((self.ns_a, self.dev_a, self.ip_a), (self.ns_b, self.dev_b, self.ip_b)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def shape(self, rate: str) -> None:
        """The sender's egress limited to rate (tbf): a slow link, queueing delay included."""
        _run("ip", "netns", "exec", self.ns_a, "tc", "qdisc", "replace", "dev", self.dev_a, "root", "tbf",
             "rate", rate, "burst", "32kbit", "latency", "400ms")

    def qdisc_stats(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns_a, "tc", "-s", "qdisc", "show", "dev", self.dev_a],
                              capture_output=True, text=True, check=True, timeout=30).stdout

    def set(self, state: str) -> None:
        """Partition (down) or heal (up) the link, from the sender's side."""
        _run("ip", "-n", self.ns_a, "link", "set", self.dev_a, state)

    def down_all(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def link() -> Iterator[Link]:
    ln = Link()
    try:
        ln.up()
        yield ln
    finally:
        ln.down_all()


class Sender:
    def __init__(self, link: Link, token: str, expire_s: float) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for k in ("SPLITSERVE_KV_TLS_CERT", "SPLITSERVE_KV_TLS_KEY", "SPLITSERVE_KV_TOKEN"):
            env.pop(k, None)
        self.p = subprocess.Popen(["ip", "netns", "exec", link.ns_a, PY, "-m", "tests.integration.netns_kv_peer",
                                   "serve", link.ip_a, token, str(expire_s)], cwd=ROOT, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self._line()
        assert line.startswith("ready "), line
        self.address = f"{link.ip_a}:{line.split()[1]}"

    def _line(self) -> str:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert line, f"sender exited ({self.p.poll()})"
        return line.strip()

    def ask(self, cmd: str) -> str:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.ask("quit")
            except (AssertionError, BrokenPipeError):
                pass
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()


def start_fetch(link: Link, address: str, rid: str, deadline_s: float, token: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(["ip", "netns", "exec", link.ns_b, PY, "-m", "tests.integration.netns_kv_peer",
                             "fetch", address, rid, str(deadline_s), token], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE)


def finish_fetch(p: subprocess.Popen[str], timeout_s: float) -> tuple[dict[str, object], int]:
    """The fetch's JSON result and how many frames it reported."""
    out, _ = p.communicate(timeout=timeout_s)  # a hang fails here, not forever
    lines = out.strip().splitlines()
    return json.loads(lines[-1]), sum(1 for ln in lines if ln.startswith("frame "))


def test_kv_over_a_slow_link_arrives_intact(link: Link) -> None:
    link.shape("40mbit")
    token = uuid.uuid4().hex
    sender = Sender(link, token, expire_s=120)
    try:
        assert sender.ask("publish r-slow 3") == "published"
        res, frames = finish_fetch(start_fetch(link, sender.address, "r-slow", 60, token), timeout_s=120)
        assert res["ok"], res
        expected = payload("r-slow", 3)
        assert res["bytes"] == len(expected) and frames == 12  # 256 KiB parts
        import hashlib

        assert res["sha256"] == hashlib.sha256(expected).hexdigest()
        print(f"3 MiB over a 40 Mbit/s tbf link: {res['seconds']:.2f} s "
              f"({res['bytes'] * 8 / float(res['seconds']) / 1e6:.1f} Mbit/s)")
        stats = link.qdisc_stats()
        # The shaper held packets back (the link, not the hosts, set the pace).
        assert "tbf" in stats and " overlimits 0 " not in stats, stats
        # A fetch without the token is refused across the link too.
        res, _ = finish_fetch(start_fetch(link, sender.address, "r-slow", 20, "not-the-token"), timeout_s=60)
        assert not res["ok"] and "UNAUTHENTICATED" in str(res["error"]), res
        # The receiver released what it fetched (as the decode worker does): nothing held.
        assert sender.ask("held") == "held 0"
    finally:
        sender.close()


def test_partition_mid_transfer_ends_with_a_clear_error_and_leaks_nothing(link: Link) -> None:
    link.shape("8mbit")  # ~1 MB/s: the 6 MB transfer is still running when the link goes
    token = uuid.uuid4().hex
    expire_s = 20.0
    sender = Sender(link, token, expire_s=expire_s)
    try:
        assert sender.ask("publish r-cut 6") == "published"
        assert sender.ask("held") == "held 1"
        deadline_s = 4.0
        p = start_fetch(link, sender.address, "r-cut", deadline_s, token)
        assert p.stdout is not None
        first = p.stdout.readline()  # the first part arrived: the transfer is under way
        assert first.startswith("frame 0"), first
        link.set("down")
        res, frames = finish_fetch(p, timeout_s=deadline_s + 60)
        assert not res["ok"], res
        assert "deadline" in str(res["error"]), res
        assert frames < 24, (frames, res)  # it was cut, not finished (24 parts)
        print(f"partition after {frames + 1} of 24 parts: error after {res['seconds']:.2f} s "
              f"(deadline {deadline_s} s): {res['error']}")
        # The bytes it did get were never handed over as KV (fetch_parts raised).
        link.set("up")
        # The receiver could not release the parts; once they expire the sender drops
        # them: nothing leaks.
        import time

        t_end = time.monotonic() + expire_s + 60
        while sender.ask("held") != "held 0":
            assert time.monotonic() < t_end, "the sender kept the cut transfer's parts"
            time.sleep(0.5)
        # The same server serves again across the healed link.
        assert sender.ask("publish r-after 1") == "published"
        res, _ = finish_fetch(start_fetch(link, sender.address, "r-after", 60, token), timeout_s=120)
        assert res["ok"] and res["bytes"] == 1 << 20, res
    finally:
        sender.close()
