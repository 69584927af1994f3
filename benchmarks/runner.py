"""Runs a sweep: for each target (layout x node count), check the server, warm it up, then
for each rate send the open-loop arrivals and record every request. A `Collector` owns
what was measured for one layout and rewrites requests.jsonl and summary.json after each
run, so an interrupted sweep (Ctrl-C) still leaves everything measured so far on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import phases
from benchmarks.client import Endpoint, ServerInfo, make_client, preflight, send
from benchmarks.metrics import SLO, RequestRecord, compute_summary, write_records
from benchmarks.targets import Target
from benchmarks.workload import RequestSpec, Workload, replay, synthetic, trace_rate

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    rates: list[float] | None        # None: replay a trace at its own times
    duration_s: float
    slo: SLO
    workload: Workload | None        # synthetic workload, or None with a trace
    trace: list[RequestSpec] | None
    burstiness: float = 1.0
    seed: int = 0
    timeout_s: float = 60.0
    endpoint: Endpoint = "completions"
    model: str | None = None
    warmup: int = 2
    vocab_size: int = 1024
    progress: bool = True

    def describe(self) -> dict[str, Any]:
        return {"duration_s": self.duration_s, "workload": self.workload.name if self.workload else "trace",
                "prompt_tokens": [self.workload.prompt.lo, self.workload.prompt.hi] if self.workload else None,
                "output_tokens": [self.workload.output.lo, self.workload.output.hi] if self.workload else None,
                "burstiness": self.burstiness, "seed": self.seed, "timeout_s": self.timeout_s,
                "endpoint": self.endpoint}

    def requests(self, rate: float | None) -> list[RequestSpec]:
        if self.trace is not None:
            return replay(self.trace, rate, self.duration_s)
        assert self.workload is not None and rate is not None
        return synthetic(self.workload, rate, self.duration_s, self.seed, self.burstiness,
                         self.vocab_size)

    def run_rates(self) -> list[float | None]:
        return list(self.rates) if self.rates else [None]


@dataclass
class Collector:
    """Everything measured for one layout; `write` makes requests.jsonl + summary.json."""

    out_dir: Path
    layout: str
    cfg: BenchConfig
    records: list[RequestRecord] = field(default_factory=list)
    server_phases: list[dict[str, Any]] = field(default_factory=list)
    gpus: dict[str, float] = field(default_factory=dict)
    gpu_unit: str = "cpu"
    deployments: list[dict[str, Any]] = field(default_factory=list)  # where each node count ran
    interrupted: bool = False
    simulated: bool = False  # rows come from the placement simulator, not from a server

    def config(self) -> dict[str, Any]:
        return {"layout": self.layout, "simulated": self.simulated, "slo_ttft_ms": self.cfg.slo.ttft_ms,
                "slo_tpot_ms": self.cfg.slo.tpot_ms, "attainment_target": self.cfg.slo.attainment,
                "gpus": dict(self.gpus), "gpu_unit": self.gpu_unit, **self.cfg.describe()}

    def summary(self) -> dict[str, Any]:
        s = compute_summary(self.records, self.config())
        s["server_phases"] = self.server_phases
        s["deployments"] = self.deployments
        s["interrupted"] = self.interrupted
        return s

    def write(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_records(self.out_dir / "requests.jsonl", self.records)
        s = self.summary()
        (self.out_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
        return s


def _record(rate: float, nodes: int, spec: RequestSpec, res: Any) -> RequestRecord:
    def r6(x: float | None) -> float | None:
        return None if x is None else round(x, 6)

    return RequestRecord(rate=rate, nodes=nodes, arrival_s=r6(spec.arrival_s) or 0.0,
                         prompt_tokens=res.prompt_tokens, output_tokens=res.output_tokens,
                         ttft_s=r6(res.ttft_s), tpot_s=r6(res.tpot_s), e2e_s=r6(res.e2e_s),
                         ok=res.ok, error=res.error)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                 console=Console(stderr=True))  # stdout stays clean for --json
    with p:
        yield p


async def run_rate(target: Target, info: ServerInfo, cfg: BenchConfig, rate: float | None,
                   col: Collector, progress: Progress | None) -> None:
    specs = cfg.requests(rate)
    label = rate if rate is not None else round(trace_rate(cfg.trace or specs), 4)
    task = None
    if progress is not None:
        task = progress.add_task(f"{target.layout} nodes={target.nodes} rate={label}/s",
                                 total=len(specs), status="")
    failed = 0
    async with make_client(cfg.timeout_s) as client:
        before = await phases.scrape(client, target.url)

        async def one(spec: RequestSpec) -> None:
            nonlocal failed
            res = await send(client, info, spec, cfg.endpoint, cfg.timeout_s)
            col.records.append(_record(label, target.nodes, spec, res))
            failed += not res.ok
            if progress is not None and task is not None:
                progress.update(task, advance=1, status=f"failed {failed}" if failed else "")

        start = time.perf_counter()
        tasks = []
        lag = 0.0
        for spec in specs:
            delay = start + spec.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            tasks.append(asyncio.create_task(one(spec)))
        await asyncio.gather(*tasks)
        after = await phases.scrape(client, target.url)
    if lag > 0.05:
        logger.warning("client fell %.3fs behind the arrival schedule at rate %s", lag, label)
    col.server_phases.append({"nodes": target.nodes, "rate": label, "send_lag_max_s": round(lag, 6),
                              "phases": phases.breakdown(before, after)})


async def check_and_warm(target: Target, cfg: BenchConfig) -> ServerInfo:
    async with make_client(cfg.timeout_s) as client:
        info = await preflight(client, target.url, cfg.model, cfg.endpoint)
        first = cfg.requests(cfg.run_rates()[0])[: cfg.warmup]
        for spec in first:  # one at a time: compile paths, fill allocator pools
            await send(client, info, spec, cfg.endpoint, cfg.timeout_s)
    return info


def bench_target(target: Target, cfg: BenchConfig, col: Collector) -> None:
    """All rates against one running target; rewrites the collector's files after each."""
    info = asyncio.run(check_and_warm(target, cfg))
    col.gpus[str(target.nodes)] = target.gpus
    col.gpu_unit = target.gpu_unit
    col.deployments.append({"nodes": target.nodes, "url": target.url, "workers": target.workers})
    with _progress(cfg.progress) as progress:
        for rate in cfg.run_rates():
            asyncio.run(run_rate(target, info, cfg, rate, col, progress))
            col.write()


def sweep(targets: list[Callable[[], ContextManager[Target]]], cfg: BenchConfig,
          col: Collector) -> dict[str, Any]:
    """Run every target (one per node count) in turn. Ctrl-C: marks the collector
    interrupted, writes what it has and re-raises."""
    try:
        for make in targets:
            with make() as target:
                try:
                    bench_target(target, cfg, col)
                except KeyboardInterrupt:  # write before the (slow) teardown
                    col.interrupted = True
                    col.write()
                    raise
    except KeyboardInterrupt:
        col.interrupted = True
        col.write()
        raise
    return col.write()
