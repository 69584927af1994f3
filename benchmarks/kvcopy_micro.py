"""Per-copy breakdown of the same-node KV transfer (issue 17 item 4), in one process, one
thread, CPU time, interleaved, medians: a plain 64 MiB copy (torch ``copy_``) against the
sender's copy into a slot and the receiver's scatter into 16-token blocks, each with its
checksum, the fused loops of engine.kvcopy (numba) against the numpy/torch copies and
separate checksums they replace.

    python -m benchmarks.kvcopy_micro --json [--mb 64] [--runs 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from engine import kvcopy
    from engine.runner import ModelRunner
    from kvtransfer import shm

    layers, kvh, hd, bs = 30, 3, 64, 16  # SmolLM2-135M, fp32
    tokens = (args.mb << 20) // (layers * 2 * kvh * hd * 4)
    shape = (layers, 2, tokens, kvh, hd)
    kv = torch.randn(shape)
    nbytes = kv.numel() * 4
    blocks = -(-tokens // bs)
    runner = ModelRunner(torch.nn.Identity(), [torch.zeros(2, blocks + 8, bs, kvh, hd) for _ in range(layers)], bs)
    table = torch.randperm(blocks + 8)[:blocks].numpy().astype(np.int64)  # as admission passes it
    src, dst = torch.randn(nbytes // 4), torch.zeros(nbytes // 4)
    slot = torch.zeros(shape)
    assert kvcopy.available()

    def with_kernels(on: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            saved = kvcopy._kernels
            if not on:
                kvcopy._kernels = False
            try:
                return fn()
            finally:
                kvcopy._kernels = saved
        return run

    def put_plain() -> None:
        step = shm.piece_tokens(shape, 4)
        for layer, j, a, b in shm.pieces(shape, step):
            piece = slot[layer, j, a:b]
            piece.copy_(kv[layer, j, a:b])
            shm.checksum(piece)

    def put_fused() -> None:  # as ShmArena.put: all rows in one call
        kvcopy.copy_rows_sum(shm._words1(slot).reshape(2 * layers, -1), shm._words1(kv).reshape(2 * layers, -1))

    def scatter(on: bool) -> Callable[[], None]:
        def run() -> None:
            for layer in range(layers):
                for j in (0, 1):
                    piece = slot[layer, j]
                    got = runner.write_kv(table, layer, 0, piece, j, checksum=True)
                    if got is None:
                        shm.checksum(piece)
        return with_kernels(on, run)

    def gather(on: bool) -> Callable[[], None]:
        def run() -> None:
            sums: list[int] = []
            runner.export_kv(table, tokens, slot, sums)
            if not sums:
                for layer in range(layers):
                    for j in (0, 1):
                        shm.checksum(slot[layer, j])
        return with_kernels(on, run)

    cases: dict[str, Callable[[], Any]] = {
        "memcpy (torch copy_)": lambda: dst.copy_(src),
        "numpy copyto": lambda: np.copyto(dst.numpy(), src.numpy()),
        "put: copy + piece checksums (session 8)": put_plain,
        "put: fused copy_sum": put_fused,
        "receive: numpy scatter + checksums (session 8)": scatter(False),
        "receive: fused scatter_sum": scatter(True),
        "export: torch gather + checksums (session 8)": gather(False),
        "export: fused gather_sum": gather(True),
    }
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    wall: dict[str, list[float]] = {k: [] for k in cases}
    load0 = os.getloadavg()
    for i in range(args.runs + 1):
        for k, fn in cases.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            if i:
                cpu[k].append(time.thread_time() - c0)
                wall[k].append(time.perf_counter() - t0)
    base = statistics.median(cpu["memcpy (torch copy_)"])
    res = {"bytes": nbytes, "shape": list(shape), "runs": args.runs, "load_avg": [load0, os.getloadavg()],
           "cases": {k: {"cpu_ms": statistics.median(cpu[k]) * 1e3, "wall_ms": statistics.median(wall[k]) * 1e3,
                         "memcpy_over_this_cpu": base / statistics.median(cpu[k])} for k in cases}}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res["cases"].items():
            print(f"{k:48s} {v['cpu_ms']:7.2f} ms CPU  {v['wall_ms']:7.2f} ms wall  {v['memcpy_over_this_cpu']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
