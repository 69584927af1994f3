"""`splitserve bench`: goodput across rates and node counts (DESIGN.md, fixed interface).

    python -m benchmarks.bench --manifest deploy/manifests/demo.yaml --rates 1,2 --duration 20 \\
        --slo-ttft-ms 1000 --slo-tpot-ms 100 --out /tmp/bench
    python -m benchmarks.bench --url http://127.0.0.1:8000 --rates 2 --duration 30 ... --out DIR
    python -m benchmarks.bench --compare A.yaml B.yaml --workload summarize ... --out DIR
    python -m benchmarks.bench --manifest demo.yaml --nodes 1,2,3 ... --out DIR

Writes DIR/requests.jsonl, DIR/summary.json and PNG plots (with --compare: one
subdirectory per layout, DIR/compare.json and plots of both in DIR). Exit codes: 0 done,
1 the server failed its check or the deployment failed, 2 bad input, 130 interrupted
(what was measured so far is written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ContextManager

from rich.console import Console

from benchmarks.client import ServerCheckError
from benchmarks.metrics import SLO
from benchmarks.workload import WORKLOADS, Workload, WorkloadError, load_trace, parse_length



class BadInput(ValueError):
    """Exit 2, with a message naming the flag, file or line."""


def _rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a number; expected "
                                             "positive requests/s separated by commas, e.g. 1,2,4")
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: rates must be > 0 requests/s")
        out.append(v)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a rate")
    return sorted(out)


def _nodes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not an integer node count") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{v}: node counts must be >= 1")
        out.append(v)
    return sorted(set(out))


def _positive(name: str) -> Callable[[str], float]:
    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, found {text}")
        return v
    return conv


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="bench a running OpenAI-compatible server at this base URL")
    src.add_argument("--manifest", help="deploy this manifest in-process, bench it, stop it")
    src.add_argument("--compare", nargs=2, metavar=("A.yaml", "B.yaml"),
                     help="bench two manifests on the same arrivals and print the goodput ratio A/B")
    p.add_argument("--rates", type=_rates, help="offered rates, requests/s, e.g. 1,2,4 "
                   "(required unless --trace is replayed at its own times)")
    p.add_argument("--duration", type=_positive("--duration"), required=True,
                   help="seconds of arrivals per rate")
    p.add_argument("--nodes", type=_nodes, help="node counts to sweep on fake local Ray nodes, "
                   "e.g. 1,2,4 (with --url: the one node count of that server, a label)")
    p.add_argument("--slo-ttft-ms", type=_positive("--slo-ttft-ms"),
                   help="TTFT SLO (default: the manifest's slo.ttft_ms; required with --url)")
    p.add_argument("--slo-tpot-ms", type=_positive("--slo-tpot-ms"),
                   help="TPOT SLO (default: the manifest's slo.tpot_ms; required with --url)")
    p.add_argument("--attainment", type=float, default=None,
                   help="target attainment for DistServe's goodput (default: manifest's, else 0.9)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="chat",
                   help="synthetic lengths: chat (short/short), summarize (long prompt, short "
                        "output), generate (short prompt, long output)")
    p.add_argument("--prompt-tokens", help="override the workload's prompt lengths: N or LO:HI")
    p.add_argument("--output-tokens", help="override the workload's output lengths: N or LO:HI")
    p.add_argument("--trace", help="JSONL trace to replay instead of a synthetic workload "
                   "({arrival_s, prompt|prompt_tokens, output_tokens}); with --rates its times "
                   "are rescaled to each rate")
    p.add_argument("--burstiness", type=_positive("--burstiness"), default=1.0,
                   help="gamma arrivals shape: 1 = Poisson, < 1 burstier, > 1 smoother")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=_positive("--timeout"), default=60.0,
                   help="seconds one request may take end to end before it counts as failed")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--model", help="model id to request (default: the first of /v1/models)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent one by one before each layout")
    p.add_argument("--vocab-size", type=int, default=1024, help="token ids of synthetic prompts are < this")
    p.add_argument("--cpus-per-node", type=int, help="logical CPUs of each fake node "
                   "(default: what one copy of the manifest reserves)")
    p.add_argument("--gpus", type=_positive("--gpus"), help="accelerators per node for the per-GPU "
                   "goodput (default: the manifest's GPUs, else its CPUs; with --url: 1 server)")
    p.add_argument("--address", help="Ray cluster for --manifest/--compare (default: RAY_ADDRESS, "
                   "else a local one); not with --nodes, which starts fake nodes")
    p.add_argument("--simulate", action="store_true", help="run the sweep in the placement simulator "
                   "(roofline step times of --gpu-type) instead of on Ray; rows are labelled simulated")
    p.add_argument("--gpu-type", help="GPU type for --simulate (placement/catalogue/gpus.yaml), e.g. h100")
    p.add_argument("--json", action="store_true", help="print summary.json (or compare.json) to stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `bench` to a CLI's subparsers (cluster/cli.py); func returns an exit code."""
    p = subparsers.add_parser("bench", help="goodput across rates and node counts",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


# -- set-up from arguments ----------------------------------------------------------------

def _workload(args: argparse.Namespace) -> Workload:
    w = WORKLOADS[args.workload]
    if args.prompt_tokens:
        w = Workload(w.name, parse_length(args.prompt_tokens, "--prompt-tokens"), w.output)
    if args.output_tokens:
        w = Workload(w.name, w.prompt, parse_length(args.output_tokens, "--output-tokens"))
    return w


def _load_manifests(args: argparse.Namespace) -> list[Any]:
    from cluster.errors import ManifestError
    from cluster.manifest import load_manifest

    paths = args.compare or ([args.manifest] if args.manifest else [])
    out = []
    for path in paths:
        try:
            out.append(load_manifest(path))
        except ManifestError as e:
            raise BadInput(f"{path}: " + "; ".join(e.lines())) from None
    if len(out) == 2 and out[0].name == out[1].name:
        raise BadInput(f"--compare: both manifests are named {out[0].name!r}; give them "
                       "different `name`s (they label the layouts and the output directories)")
    return out


def _config(args: argparse.Namespace, manifests: list[Any]) -> Any:
    from benchmarks.runner import BenchConfig

    if args.simulate:
        if args.url:
            raise BadInput("--simulate: simulates our manifests; use --manifest or --compare, not --url")
        if not args.gpu_type:
            raise BadInput("--simulate needs --gpu-type (a GPU of placement/catalogue/gpus.yaml, e.g. h100)")
        from placement.catalogue import gpus

        if args.gpu_type not in gpus():
            raise BadInput(f"--gpu-type: unknown GPU type {args.gpu_type!r}; known: {sorted(gpus())}")
    elif args.gpu_type:
        raise BadInput("--gpu-type only applies with --simulate")
    if args.url and args.nodes and len(args.nodes) > 1:
        raise BadInput("--nodes: with --url give one node count (the size of that server); "
                       "a sweep needs --manifest or --compare")
    if args.nodes and args.address:
        raise BadInput("--address: --nodes starts its own fake Ray cluster; drop one of them")
    if args.warmup < 0:
        raise BadInput(f"--warmup must be >= 0, found {args.warmup}")
    trace = None
    if args.trace:
        trace = load_trace(args.trace, args.vocab_size, args.seed)
    elif not args.rates:
        raise BadInput("--rates is required (unless --trace is replayed at its own times)")
    slo_src = manifests[0].slo if manifests else None
    ttft = args.slo_ttft_ms or (slo_src.ttft_ms if slo_src else None)
    tpot = args.slo_tpot_ms or (slo_src.tpot_ms if slo_src else None)
    if ttft is None or tpot is None:
        raise BadInput("--slo-ttft-ms and --slo-tpot-ms are required with --url")
    target = args.attainment if args.attainment is not None else (slo_src.attainment if slo_src else 0.9)
    if not 0 < target <= 1:
        raise BadInput(f"--attainment must be in (0, 1], found {target}")
    return BenchConfig(rates=args.rates, duration_s=args.duration, slo=SLO(ttft, tpot, target),
                       workload=None if trace else _workload(args), trace=trace,
                       burstiness=args.burstiness, seed=args.seed, timeout_s=args.timeout,
                       endpoint=args.endpoint, model=args.model, warmup=args.warmup,
                       vocab_size=args.vocab_size, progress=not args.no_progress)


def _targets(args: argparse.Namespace, manifest: Any) -> list[Callable[[], ContextManager[Any]]]:
    from benchmarks import targets

    if manifest is None:
        return [lambda: targets.url_target(args.url, (args.nodes or [1])[0], args.gpus)]
    if not args.nodes:
        return [lambda: targets.manifest_target(manifest, args.gpus)]
    return [(lambda n=n: targets.nodes_target(manifest, n, args.cpus_per_node, args.gpus))
            for n in args.nodes]


# -- running ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
    try:
        manifests = _load_manifests(args)
        cfg = _config(args, manifests)
    except (BadInput, WorkloadError) as e:
        console.print(f"[red]bench: {e}[/red]", highlight=False)
        return 2

    try:
        with _ray_for(args, manifests):
            return _run_layouts(args, cfg, manifests, console)
    except KeyboardInterrupt:  # during Ray start or stop: nothing measured yet, or all written
        console.print("[yellow]bench: interrupted[/yellow]")
        return 130


def _ray_for(args: argparse.Namespace, manifests: list[Any]) -> ContextManager[None]:
    """One Ray session for all layouts of --manifest/--compare (--nodes makes its own)."""
    if not manifests or args.nodes or args.simulate:
        return contextlib.nullcontext()
    from benchmarks.targets import manifest_cpus, ray_session

    return ray_session(args.address, max(2, math.ceil(max(manifest_cpus(m) for m in manifests))))


def _run_layouts(args: argparse.Namespace, cfg: Any, manifests: list[Any], console: Console) -> int:
    from benchmarks import report
    from benchmarks.runner import Collector, sweep

    out = Path(args.out)
    layouts = manifests or [None]
    summaries: list[dict[str, Any]] = []
    code = 0
    for m in layouts:
        name = m.name if m is not None else args.url
        if args.simulate:
            name = f"{name} (simulated {args.gpu_type})"
        col = Collector(out / m.name if args.compare else out, name, cfg)
        try:
            if args.simulate:
                from benchmarks import simulate

                summaries.append(simulate.sweep(m, args.gpu_type, args.nodes or [1], cfg, col))
            else:
                summaries.append(sweep(_targets(args, m), cfg, col))
        except ServerCheckError as e:
            console.print(f"[red]bench: {e}[/red]", highlight=False)
            return 1
        except KeyboardInterrupt:
            console.print(f"[yellow]bench: interrupted; wrote what was measured to {col.out_dir}[/yellow]")
            summaries.append(col.summary())
            code = 130
        except Exception as e:  # noqa: BLE001 - deployment failures: say what and where
            logging.getLogger(__name__).debug("bench failed", exc_info=True)
            console.print(f"[red]bench: {name}: {type(e).__name__}: {e}[/red]", highlight=False)
            if col.records:
                col.write()
            return 1
        report.print_summary(summaries[-1], console)
        if code:
            break

    result: dict[str, Any] = summaries[0]
    if args.compare and len(summaries) == 2:
        result = report.compare(summaries[0], summaries[1])
        (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        report.print_compare(result, console)
    if not args.no_plots and any(s["runs"] for s in summaries):
        for path in report.plot(summaries, out):
            console.print(f"wrote {path}")
    if args.json:
        print(json.dumps(result, indent=2))
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad flags, 0 on --help
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(BrokenPipeError):
        return int(args.func(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
