"""Ray worker processes of a cluster started from splitserve run at niceness 0, not Ray's
default 15 (cluster/__init__.py): compute workers are not preempted by every other
process on the machine."""

from __future__ import annotations

import os

import ray


@ray.remote(num_cpus=0)
def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def test_ray_workers_run_at_niceness_zero(ray_session: None) -> None:
    assert os.environ.get("RAY_worker_niceness") == "0"
    assert ray.get(_niceness.remote(), timeout=120) == 0
