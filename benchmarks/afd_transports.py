"""Part 1 of benchmarks/afd_bench.py: the per-layer hop of attention/expert disaggregation.

Round trip of a [rows, hidden] fp32 tensor between two processes, per payload size, over
the transports AFD could use: a TCP socket per pair (decode_workers/exchange.py), the same
with its shared-memory path, torch.distributed point-to-point (gloo), shared memory with a
pipe to signal, and a plain Ray actor call. Run through ``python -m benchmarks.afd_bench``.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

SIZES_KIB = (2, 16, 64, 256, 1024)
HIDDEN = 256  # fp32 columns of the payload (rows follow from the size)

# -- 1. transports -------------------------------------------------------------------
class _Echo:
    """An ExpertShard stand-in that returns its input (measures the hop alone)."""

    def run(self, req: Any) -> Any:
        return req.x.clone()


def _socket_server(conn: Any) -> None:
    import torch

    torch.set_num_threads(1)
    from decode_workers.exchange import ExpertServer

    server = ExpertServer(_Echo())  # type: ignore[arg-type]
    conn.send(server.address)
    conn.recv()
    server.stop()


def _rounds(n_kib: int, reps: int) -> int:
    return max(20, reps * 64 // max(n_kib, 64))


def bench_exchange_shm(reps: int) -> dict[int, float]:
    """The exchange with its same-node path: rows in shared memory, headers on the socket."""
    return bench_socket(reps, shm=True)


def bench_socket(reps: int, shm: bool = False) -> dict[int, float]:
    import torch

    from decode_workers.exchange import SocketExchange
    from engine.experts import ExpertRequest

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_socket_server, args=(b,), daemon=True)
    p.start()
    addr = tuple(a.recv())
    ex = SocketExchange([[[0]]], {0: addr}, timeout_s=30, shm=shm)
    out = {}
    try:
        for kib in SIZES_KIB:
            rows = kib * 1024 // (4 * HIDDEN)
            x = torch.randn(rows, HIDDEN)
            req = ExpertRequest(0, x, [(0, rows)])
            times = []
            for i in range(_rounds(kib, reps) + 5):
                t0 = time.perf_counter()
                ex.send(0, i, req)
                y = ex.recv(0, i)
                times.append(time.perf_counter() - t0)
            assert torch.equal(y, x)
            assert ex.uses_shm(0) == shm
            out[kib] = statistics.median(times[5:])
    finally:
        ex.close()
        a.send("stop")
        p.join(10)
    return out


def _gloo_peer(port: int, sizes: list[int], n: list[int]) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    for kib, k in zip(sizes, n):
        buf = torch.empty(kib * 1024 // 4)
        for _ in range(k):
            dist.recv(buf, 0)
            dist.send(buf, 0)
    dist.destroy_process_group()


def bench_gloo(reps: int) -> dict[int, float]:
    import datetime

    import torch
    import torch.distributed as dist

    from cluster.worker_base import _free_port

    port = _free_port()
    n = [_rounds(kib, reps) + 5 for kib in SIZES_KIB]
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_gloo_peer, args=(port, list(SIZES_KIB), n), daemon=True)
    p.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        for kib, k in zip(SIZES_KIB, n):
            x = torch.randn(kib * 1024 // 4)
            y = torch.empty_like(x)
            times = []
            for _ in range(k):
                t0 = time.perf_counter()
                dist.send(x, 1)
                dist.recv(y, 1)
                times.append(time.perf_counter() - t0)
            assert torch.equal(x, y)
            out[kib] = statistics.median(times[5:])
    finally:
        dist.destroy_process_group()
        p.join(10)
    return out


def _shm_peer(name: str, nbytes: int, conn: Any) -> None:
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name)
    try:
        while True:
            msg = conn.recv()  # (offset in, length) or None
            if msg is None:
                return
            n = msg
            shm.buf[nbytes:nbytes + n] = shm.buf[:n]  # the reply region
            conn.send(n)
    finally:
        shm.close()


def bench_shm(reps: int) -> dict[int, float]:
    """One shared segment (request half, reply half); a Pipe carries the doorbell."""
    from multiprocessing import shared_memory

    import numpy as np

    big = max(SIZES_KIB) * 1024
    shm = shared_memory.SharedMemory(create=True, size=2 * big)
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_shm_peer, args=(shm.name, big, b), daemon=True)
    p.start()
    out = {}
    try:
        for kib in SIZES_KIB:
            n = kib * 1024
            x = np.random.default_rng(0).random(n // 8)
            times = []
            for _ in range(_rounds(kib, reps) + 5):
                t0 = time.perf_counter()
                shm.buf[:n] = x.view(np.uint8)
                a.send(n)
                a.recv()
                y = np.frombuffer(bytes(shm.buf[big:big + n]), dtype=np.float64)
                times.append(time.perf_counter() - t0)
            assert np.array_equal(x, y)
            out[kib] = statistics.median(times[5:])
    finally:
        a.send(None)
        p.join(10)
        shm.close()
        shm.unlink()
    return out


def bench_ray(reps: int) -> dict[int, float]:
    import numpy as np

    import cluster  # noqa: F401 - Ray environment (loopback, auth)
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
                 log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, x: Any) -> Any:
            return x

    actor = Echo.remote()  # type: ignore[attr-defined]
    ray.get(actor.echo.remote(0), timeout=60)
    out = {}
    try:
        for kib in SIZES_KIB:
            x = np.random.default_rng(0).random(kib * 1024 // 8)
            times = []
            for _ in range(_rounds(kib, reps) + 5):
                t0 = time.perf_counter()
                y = ray.get(actor.echo.remote(x), timeout=60)
                times.append(time.perf_counter() - t0)
            assert np.array_equal(x, y)
            out[kib] = statistics.median(times[5:])
    finally:
        ray.kill(actor)
        if started:
            ray.shutdown()
    return out


TRANSPORTS = {"socket": bench_socket, "exchange_shm": bench_exchange_shm, "gloo": bench_gloo, "shm_pipe": bench_shm,
              "ray_call": bench_ray}
