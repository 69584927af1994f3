"""Same-node KV transfer against a memory copy, for benchmarks/overhead.py (part 3): a
prefill-like actor sends KV of the model's shape by the object store or its shared-memory
arena, a decode-like actor writes it into a paged cache; interleaved with plain copies of
the same bytes, in the driver and in an actor."""

from __future__ import annotations

import statistics
import time
from typing import Any

import cluster  # noqa: F401 - Ray environment
import ray
import torch


class _kernels:
    """Turn engine.kvcopy's fused loops off for a block (as where numba is missing)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        from engine import kvcopy

        kvcopy.available()  # compiled before any timing
        self.saved = kvcopy._kernels
        if not self.on:
            kvcopy._kernels = False

    def __exit__(self, *exc: Any) -> None:
        from engine import kvcopy

        kvcopy._kernels = self.saved


@ray.remote(num_cpus=0)
class _KVSender:
    """A prefill worker's side: its arena (pre-faulted at start, as a worker's) and the
    object store."""

    def __init__(self, shape: tuple[int, ...], arena_bytes: int) -> None:
        from kvtransfer.shm import ShmArena

        torch.set_num_threads(1)
        self.kv = torch.randn(shape)
        self.arena = ShmArena(arena_bytes)
        self.sent = 0

    def send(self, transport: str) -> tuple[Any, float, float]:
        """(handle, wall seconds, this thread's CPU seconds). "shm_plain": the arena without
        engine.kvcopy's fused loops (session 8's copies and separate checksums)."""
        from kvtransfer.connector import ObjectStoreConnector

        # The previous transfer's slot freed; a fresh id each time (the arena remembers a
        # released id, so that a late put of an ended request publishes nothing).
        self.arena.release(f"bench-{self.sent}")
        self.sent += 1
        rid = f"bench-{self.sent}"
        with _kernels(transport != "shm_plain"):
            t0, c0 = time.perf_counter(), time.thread_time()
            if transport.startswith("shm"):
                h = self.arena.put(rid, self.kv)
            else:
                h = ObjectStoreConnector().send(rid, self.kv)
            return h, time.perf_counter() - t0, time.thread_time() - c0


@ray.remote(num_cpus=0)
class _KVReceiver:
    """A decode worker's side: a paged cache of the model's shape; the KV lands in
    scattered blocks (a shuffled block table)."""

    def __init__(self, shape: tuple[int, ...], block_size: int = 16) -> None:
        from engine.runner import ModelRunner

        torch.set_num_threads(1)
        layers, _, tokens, kvh, hd = shape
        blocks = -(-tokens // block_size) + 8
        self.runner = ModelRunner(torch.nn.Identity(), [torch.zeros(2, blocks, block_size, kvh, hd)
                                                         for _ in range(layers)], block_size)
        # numpy tables, as decode_workers.admission passes them.
        self.table = torch.randperm(blocks)[: -(-tokens // block_size)].numpy().astype("int64")
        # As a fresh worker's block manager hands them out (ascending): long contiguous runs.
        self.fresh = torch.arange(-(-tokens // block_size)).numpy().astype("int64")

    def receive(self, handle: Any, kernels: bool = True, fresh: bool = False) -> tuple[float, float]:
        """(wall seconds, this thread's CPU seconds); ``kernels``: with engine.kvcopy;
        ``fresh``: into ascending blocks instead of shuffled ones."""
        from kvtransfer.connector import ObjectStoreConnector, ShmConnector

        table = self.fresh if fresh else self.table
        with _kernels(kernels):
            t0, c0 = time.perf_counter(), time.thread_time()
            if handle.transport == "shm":
                ShmConnector().receive_into(
                    handle, lambda layer, j, first, kv: self.runner.write_kv(table, layer, first, kv, j,
                                                                             checksum=True), 60)
            else:
                kv = ObjectStoreConnector().receive(handle, timeout_s=60)
                self.runner.import_kv(table, kv)
            return time.perf_counter() - t0, time.thread_time() - c0

    def memcpy(self, nbytes: int) -> tuple[float, float]:
        """A plain copy of the same bytes in this actor (same process, same thread count):
        (wall seconds, CPU seconds)."""
        if not hasattr(self, "_src"):
            self._src = torch.randn(nbytes // 4)
            self._dst = torch.zeros_like(self._src)
        t0, c0 = time.perf_counter(), time.thread_time()
        self._dst.copy_(self._src)
        return time.perf_counter() - t0, time.thread_time() - c0


def kv_transfer_ratio(nbytes: int, runs: int, layers: int = 4, kv_heads: int = 2,
                      head_dim: int = 16) -> dict[str, Any]:
    """Object store and arena, interleaved (object store, arena, memcpy, ...), for KV of
    the model's shape (fp32) of about nbytes, into a paged cache."""
    tokens = max(1, nbytes // (layers * 2 * kv_heads * head_dim * 4))
    shape = (layers, 2, tokens, kv_heads, head_dim)
    real = layers * 2 * tokens * kv_heads * head_dim * 4
    sender, receiver = _KVSender.remote(shape, 2 * real + (1 << 20)), _KVReceiver.remote(shape)
    src = torch.randn(real // 4)
    dst = torch.zeros_like(src)
    # shm_plain: the arena without engine.kvcopy (session 8); shm_fresh: the arena into
    # ascending blocks (a fresh block manager) rather than shuffled ones (the other kinds).
    kinds = ("object_store", "shm", "shm_plain", "shm_fresh")
    times: dict[str, list[float]] = {**{k: [] for k in kinds}, "memcpy": [], "memcpy_actor": []}
    parts: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    # CPU seconds of the sending and receiving threads (a loaded machine takes the core away
    # mid-copy: wall time then measures the load, CPU time the work).
    cpu: dict[str, list[float]] = {**{k: [] for k in kinds}, "memcpy_actor": []}
    for i in range(runs + 1):  # the first round warms up (attaching the arena, first faults)
        for transport in kinds:
            handle, send_s, send_cpu = ray.get(sender.send.remote(transport))
            recv_s, recv_cpu = ray.get(receiver.receive.remote(handle, transport != "shm_plain",
                                                               transport == "shm_fresh"))
            if i:
                times[transport].append(send_s + recv_s)
                parts[transport].append((send_s, recv_s))
                cpu[transport].append(send_cpu + recv_cpu)
        t0 = time.perf_counter()
        dst.copy_(src)
        actor_copy, actor_cpu = ray.get(receiver.memcpy.remote(real))
        if i:
            times["memcpy"].append(time.perf_counter() - t0)
            times["memcpy_actor"].append(actor_copy)
            cpu["memcpy_actor"].append(actor_cpu)
    c = statistics.median(times["memcpy"])
    ca = statistics.median(times["memcpy_actor"])
    # Minimums too: on a loaded machine the fastest of the interleaved runs is the closest
    # to the undisturbed cost of each path.
    cm = min(times["memcpy_actor"])
    out: dict[str, Any] = {"bytes": real, "shape": list(shape), "runs": runs, "memcpy_s": c,
                           "memcpy_gbps": real / c / 1e9, "memcpy_in_actor_s": ca, "memcpy_in_actor_s_min": cm,
                           "memcpy_in_actor_cpu_s": statistics.median(cpu["memcpy_actor"])}
    for transport in kinds:
        t = statistics.median(times[transport])
        tm = min(times[transport])
        out[transport] = {"transfer_s": t, "transfer_gbps": real / t / 1e9, "ratio": c / t,
                          "ratio_vs_actor_memcpy": ca / t, "transfer_s_min": tm, "ratio_min_vs_actor_memcpy_min": cm / tm,
                          "cpu_s_p50": statistics.median(cpu[transport]),
                          "ratio_cpu_vs_actor_memcpy_cpu": statistics.median(cpu["memcpy_actor"])
                          / statistics.median(cpu[transport]),
                          "send_s_min": min(p[0] for p in parts[transport]),
                          "receive_s_min": min(p[1] for p in parts[transport]),
                          "send_s_p50": statistics.median(p[0] for p in parts[transport]),
                          "receive_s_p50": statistics.median(p[1] for p in parts[transport])}
    # Earlier figures read "ratio" as the object store's.
    out["ratio"] = out["shm"]["ratio"]
    return out
