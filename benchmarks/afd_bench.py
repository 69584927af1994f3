"""Attention/expert disaggregation (AFD) on this machine, two parts:

1. **The per-layer hop** (``benchmarks/afd_transports.py``). Round trip of a [rows, hidden] fp32 tensor between two
   processes, per payload size, over four transports: a TCP socket per pair (what
   decode_workers/exchange.py uses), torch.distributed point-to-point (gloo here),
   shared memory with a pipe to signal, and a plain Ray actor call.
2. **The decode step.** A MoE model (``make-model --arch mixtral`` at the ``small`` size:
   hidden 256, 8 layers, 8 experts, top-2) decoding batches of 1..64 sequences: the plain
   decode engine against AFD with the experts in ``--shards`` separate processes (real
   sockets), micro_batches 1 (lock-step) and 2 (ping-pong). Per step: time in attention
   (attention side's compute: attention, norms, routing, dispatch, combine), waiting
   (attention side blocked on the exchange: transport plus expert compute not hidden),
   experts (expert side's compute, mean over shards) and expert idle (step minus that).
   The ping-pong ratio is the step time with 2 micro-batches over the lock-step (serial)
   step time at the same batch; decode tokens/s per reserved core counts the attention
   process and every expert process as one core each.

Every process runs torch with one thread. This machine has 2 cores shared with other
work, so AFD's 1 + shards processes are oversubscribed: the figures say what the hop
and the split cost here, not what they cost on dedicated hardware.

    PYTHONPATH=. python -m benchmarks.afd_bench [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.afd_transports import TRANSPORTS


# -- 2. decode steps -----------------------------------------------------------------
def runqueue_wait_s(pid: int | str = "self", thread: bool = False) -> float:
    """Seconds the thread (or every thread of the process) waited runnable for a core
    (Linux /proc schedstat, field 2); 0 where unavailable."""
    try:
        if thread:
            return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
        total = 0
        for t in Path(f"/proc/{pid}/task").iterdir():
            total += int((t / "schedstat").read_text().split()[1])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _expert_process(model_dir: str, experts: list[list[int]], conn: Any) -> None:
    import torch

    torch.set_num_threads(1)
    from decode_workers.exchange import ExpertServer
    from engine.experts import ExpertShard

    server = ExpertServer(ExpertShard.load_from(model_dir, torch.float32, experts))
    conn.send(server.address)
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            # (compute wall, compute CPU, the whole process's CPU: compute + exchange threads)
            conn.send((server.shard.busy_s, server.shard.busy_cpu_s, time.process_time(), runqueue_wait_s()))
        else:
            server.stop()
            return


def bench_model_dir() -> str:
    from models.builtin import cache_root
    from models.make import make_model

    out = cache_root() / "bench" / "small-mixtral-v1"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        make_model("mixtral", tmp / "m", seed=0, size="small")
        (tmp / "m").rename(out)
    return str(out)


def _decode_engine(runner: Any, batch: int, context: int, cfg: Any) -> Any:
    import torch

    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    eng = LLMEngine(runner, SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=256, max_model_len=8192),
                    runner.kv_caches[0].shape[1], eos_token_ids=[])
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        eng.add_request(f"r{i}", torch.randint(3, cfg.vocab_size, (context,), generator=g).tolist(),
                        SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
    while eng.scheduler.waiting or any(s.num_computed_tokens < len(s.prompt_token_ids)
                                       for s in eng.scheduler.running):
        eng.step()
    return eng


def bench_steps(batches: list[int], context: int, steps: int, shards: int, shm: bool = True) -> list[dict[str, Any]]:
    """Plain, lock-step (mb1) and ping-pong (mb2) decode steps in turn at each batch.
    Besides wall times (which the machine's load inflates), the CPU time of every part:
    the attention side's thread (attention; exchange), each expert process (compute;
    the whole process, exchange threads included). CPU times are the work itself, which
    bounds what any overlap can reach on 2 cores."""
    import torch

    torch.set_num_threads(1)
    from decode_workers.exchange import SocketExchange
    from engine.afd import build_attention_runner
    from engine.experts import even_placement, shard_experts
    from engine.config import ModelConfig
    from engine.engine import build_runner

    model_dir = bench_model_dir()
    cfg = ModelConfig.from_dir(model_dir)
    blocks = max((max(batches) * (context + steps + 8)) // 16 + 8, (context + 1000) // 16 + 8)
    placement = even_placement(cfg.num_hidden_layers, cfg.num_local_experts, shards)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for s in range(shards):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_expert_process, args=(model_dir, shard_experts(placement, s), b), daemon=True)
        p.start()
        procs.append(p)
        conns.append(a)
    addrs = {s: tuple(c.recv()) for s, c in enumerate(conns)}
    plain_runner = build_runner(model_dir, "float32", blocks, 16)
    rows: list[dict[str, Any]] = []

    def expert_stats() -> list[tuple[float, float, float]]:
        for c in conns:
            c.send("stats")
        return [c.recv() for c in conns]

    def med(xs: list[float]) -> float:
        return 1e3 * statistics.median(xs)

    try:
        for batch in batches:
            # The three variants step in turn (plain, lock-step, ping-pong), so that the
            # machine's drifting speed hits them alike.
            runners: dict[str, Any] = {"plain": plain_runner}
            exchanges: dict[str, Any] = {}
            for mb in (1, 2):
                exchanges[f"mb{mb}"] = SocketExchange(placement, addrs, timeout_s=60, shm=shm)
                runners[f"mb{mb}"] = build_attention_runner(model_dir, "float32", blocks, 16,
                                                            exchanges[f"mb{mb}"], mb)
            engines = {k: _decode_engine(r, batch, context, cfg) for k, r in runners.items()}
            per: dict[str, list[dict[str, float]]] = {k: [] for k in engines}
            load0 = os.getloadavg()[0]
            for _ in range(steps):
                for k, eng in engines.items():
                    b0 = expert_stats() if k != "plain" else []
                    t0, c0, q0 = time.perf_counter(), time.thread_time(), runqueue_wait_s(thread=True)
                    eng.step()
                    dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                    dq = runqueue_wait_s(thread=True) - q0
                    if k == "plain":
                        per[k].append({"step": dt, "cpu": dc, "runqueue": dq})
                        continue
                    b1 = expert_stats()
                    r = runners[k].last
                    comp = [y[1] - x[1] for x, y in zip(b0, b1)]
                    proc = [y[2] - x[2] for x, y in zip(b0, b1)]
                    per[k].append({"step": dt, "attention": r.attention_s, "wait": r.wait_s,
                                   "experts": statistics.mean(y[0] - x[0] for x, y in zip(b0, b1)),
                                   "attention_cpu": r.attention_cpu_s, "exchange_cpu": r.wait_cpu_s,
                                   "experts_cpu_max": max(comp), "experts_cpu_sum": sum(comp),
                                   "expert_procs_cpu_max": max(proc), "expert_procs_cpu_sum": sum(proc),
                                   # waiting runnable for a core: the attention thread, the experts
                                   "attention_runqueue": dq,
                                   "experts_runqueue_max": max(y[3] - x[3] for x, y in zip(b0, b1))})
            for ex in exchanges.values():
                ex.close()
            plain = statistics.median(x["step"] for x in per["plain"])
            row: dict[str, Any] = {"batch": batch, "context": context, "plain_step_ms": 1e3 * plain,
                                   "plain_cpu_ms": med([x["cpu"] for x in per["plain"]]),
                                   "plain_runqueue_ms": med([x["runqueue"] for x in per["plain"]]),
                                   "plain_tok_s_per_core": batch / plain, "shm": shm,
                                   "load_avg": [round(load0, 1), round(os.getloadavg()[0], 1)]}
            for mb in (1, 2):
                k = f"mb{mb}"
                v = {f: med([x[f] for x in per[k]]) for f in per[k][0]}
                # Serial sum of the parts (CPU): the attention side's work (its thread is
                # serial), then the slowest expert process; nothing overlapped.
                serial = v["attention_cpu"] + v["exchange_cpu"] + v["expert_procs_cpu_max"]
                # Best any schedule of this work can do on 2 cores: the attention side is
                # one thread; all processes' work shares the 2 cores.
                total = v["attention_cpu"] + v["exchange_cpu"] + v["expert_procs_cpu_sum"]
                bound = max(v["attention_cpu"] + v["exchange_cpu"], total / 2)
                row[k] = {"step_ms": v["step"], "attention_ms": v["attention"], "wait_ms": v["wait"],
                          "experts_ms": v["experts"], "expert_idle_ms": max(0.0, v["step"] - v["experts"]),
                          "exchange_ms": max(0.0, v["wait"] - v["experts"]) if mb == 1 else None,
                          "attention_cpu_ms": v["attention_cpu"], "exchange_cpu_ms": v["exchange_cpu"],
                          "experts_cpu_max_ms": v["experts_cpu_max"], "experts_cpu_sum_ms": v["experts_cpu_sum"],
                          "expert_procs_cpu_max_ms": v["expert_procs_cpu_max"],
                          "expert_procs_cpu_sum_ms": v["expert_procs_cpu_sum"],
                          "attention_runqueue_ms": v["attention_runqueue"],
                          "experts_runqueue_max_ms": v["experts_runqueue_max"],
                          "serial_cpu_ms": serial, "total_cpu_ms": total, "two_core_bound_ms": bound,
                          "tok_s_per_core": batch / (v["step"] / 1e3) / (1 + shards),
                          "round_trips_per_step": exchanges[k].round_trips / max(1, runners[k].total.steps),
                          "shm_messages": exchanges[k].shm_messages}
            m1, m2 = row["mb1"], row["mb2"]
            row["pingpong_ratio"] = m2["step_ms"] / m1["step_ms"]
            # What the target (<= 0.75 of the serial sum) can reach at best on 2 cores.
            row["best_vs_lockstep"] = m2["two_core_bound_ms"] / m1["serial_cpu_ms"]
            row["best_vs_own_serial"] = m2["two_core_bound_ms"] / m2["serial_cpu_ms"]
            row["work_mb2_over_mb1"] = m2["total_cpu_ms"] / m1["total_cpu_ms"]
            row["afd_vs_plain_step"] = m2["step_ms"] / row["plain_step_ms"]
            rows.append(row)
            print(f"batch {batch} (load {load0:.1f}): plain {row['plain_step_ms']:.1f} ms; mb1 {m1['step_ms']:.1f} ms "
                  f"(CPU: attention {m1['attention_cpu_ms']:.1f}, exchange {m1['exchange_cpu_ms']:.1f}, experts "
                  f"{m1['experts_cpu_max_ms']:.1f}/proc {m1['expert_procs_cpu_max_ms']:.1f}); mb2 {m2['step_ms']:.1f} ms "
                  f"(CPU: attention {m2['attention_cpu_ms']:.1f}, exchange {m2['exchange_cpu_ms']:.1f}, experts "
                  f"{m2['experts_cpu_max_ms']:.1f}/proc {m2['expert_procs_cpu_max_ms']:.1f}); wall mb2/mb1 "
                  f"{row['pingpong_ratio']:.2f}, work mb2/mb1 {row['work_mb2_over_mb1']:.2f}, best on 2 cores "
                  f"{row['best_vs_lockstep']:.2f} of lock-step", file=sys.stderr, flush=True)
    finally:
        for c in conns:
            c.send("stop")
        for p in procs:
            p.join(10)
    return rows


def simulate_vs_measured(rows: list[dict[str, Any]], layers: int = 8, top_k: int = 2, shards: int = 2,
                         cores: float = 2.0) -> dict[str, Any]:
    """The simulator (placement.latency.AttentionExpert) against the measured decode steps:
    coefficients fitted to the lock-step (mb1) steps' parts, wall and CPU, then every
    step predicted, lock-step and ping-pong, with the pools on their own cores (the model
    as it was) and sharing ``cores`` (the model's shared-cores bound). Wall: what a step
    took here under the load it ran at; CPU: the work alone, against the measured 2-core
    bound of the ping-pong (``two_core_bound_ms``)."""
    from dataclasses import replace

    from placement.attention_expert import ae_fit

    out: dict[str, Any] = {"layers": layers, "top_k": top_k, "shards": shards, "cores": cores, "rows": []}
    ctx = {r["batch"]: r["batch"] * (r["context"] + 6) for r in rows}
    wall = ae_fit([(r["batch"], ctx[r["batch"]], r["mb1"]["attention_ms"] / 1e3, r["mb1"]["experts_ms"] / 1e3,
                    (r["mb1"]["exchange_ms"] or 0.0) / 1e3) for r in rows], layers, top_k, 1, shards, 1)
    cpu = ae_fit([(r["batch"], ctx[r["batch"]], (r["mb1"]["attention_cpu_ms"]) / 1e3,
                   r["mb1"]["expert_procs_cpu_max_ms"] / 1e3, r["mb1"]["exchange_cpu_ms"] / 1e3) for r in rows],
                 layers, top_k, 1, shards, 1)
    out["fit_wall"] = {"attention": vars(wall.attention), "expert": vars(wall.expert), "comm": vars(wall.comm)}
    out["fit_cpu"] = {"attention": vars(cpu.attention), "expert": vars(cpu.expert), "comm": vars(cpu.comm)}
    for r in rows:
        b, c = r["batch"], ctx[r["batch"]]
        row: dict[str, Any] = {"batch": b, "load_avg": r.get("load_avg")}
        for mb in (1, 2):
            k = f"mb{mb}"
            free = replace(wall, micro_batches=mb).step_s(b, c) * 1e3
            shared = replace(wall, micro_batches=mb, cores=cores).step_s(b, c) * 1e3
            cpu_shared = replace(cpu, micro_batches=mb, cores=cores).step_s(b, c) * 1e3
            # Batch 1 has one part whatever micro_batches says: its step is lock-step.
            cpu_measured = r[k]["two_core_bound_ms"] if mb == 2 and b >= 2 else r[k]["serial_cpu_ms"]
            row[k] = {"measured_ms": r[k]["step_ms"], "predicted_own_cores_ms": free,
                      "predicted_shared_cores_ms": shared,
                      "error_own_cores": free / r[k]["step_ms"] - 1, "error_shared_cores": shared / r[k]["step_ms"] - 1,
                      "cpu_predicted_shared_ms": cpu_shared,
                      "cpu_measured_ms": cpu_measured, "cpu_error": cpu_shared / cpu_measured - 1}
        out["rows"].append(row)
        print(f"batch {b}: " + "; ".join(
            f"mb{mb} measured {row[f'mb{mb}']['measured_ms']:.1f} ms, predicted {row[f'mb{mb}']['predicted_own_cores_ms']:.1f}"
            f" (own cores, {100 * row[f'mb{mb}']['error_own_cores']:+.0f}%) / {row[f'mb{mb}']['predicted_shared_cores_ms']:.1f}"
            f" (shared, {100 * row[f'mb{mb}']['error_shared_cores']:+.0f}%); CPU {row[f'mb{mb}']['cpu_measured_ms']:.1f} vs "
            f"{row[f'mb{mb}']['cpu_predicted_shared_ms']:.1f} ({100 * row[f'mb{mb}']['cpu_error']:+.0f}%)"
            for mb in (1, 2)), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="afd_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, batches 1, 16")
    ap.add_argument("--shards", type=int, default=2, help="expert processes")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per configuration")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,4,16,64; --quick 1,16)")
    ap.add_argument("--no-shm", action="store_true", help="decode steps over the socket alone")
    ap.add_argument("--simulate-from", metavar="JSON", help="only compare the simulator with the steps stored in "
                    "this JSON (a previous --out) and print that comparison")
    ap.add_argument("--steps-only", action="store_true", help="skip the transport round trips")
    ap.add_argument("--transports", default="socket,exchange_shm,gloo,shm_pipe,ray_call",
                    help="which round trips to measure")
    args = ap.parse_args(argv)
    if args.simulate_from:
        stored = json.loads(Path(args.simulate_from).read_text())
        sim = simulate_vs_measured(stored["steps"], shards=args.shards)
        print(json.dumps(sim, indent=2))
        return 0
    reps = 50 if args.quick else 200
    import torch

    # One torch thread, as in the workers: with more, OpenMP's spinning threads make every
    # copy of a shared-memory payload crawl on this oversubscribed machine (50 ms a MiB).
    torch.set_num_threads(1)
    batches = [1, 16] if args.quick else [1, 4, 16, 64]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]},
                           "transport_round_trip_ms": {}}
    for name in ([] if args.steps_only else args.transports.split(",")):
        r = TRANSPORTS[name](reps)
        res["transport_round_trip_ms"][name] = {f"{k}KiB": round(1e3 * v, 4) for k, v in r.items()}
        print(f"{name}: " + ", ".join(f"{k} KiB {1e3 * v:.3f} ms" for k, v in r.items()), file=sys.stderr)
    res["steps"] = bench_steps(batches, args.context, 6 if args.quick else args.steps, args.shards,
                               shm=not args.no_shm)
    res["simulator"] = simulate_vs_measured(res["steps"], shards=args.shards)
    res["machine"]["load_avg_end"] = os.getloadavg()[0]
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
