"""TTFT of a long prompt prefilled on one fake node and decoded on another, raw KV vs
adaptive transfer, over links of several speeds (the transport paces itself to emulate
the link: ``kv_transfer.rate_limit_gbps``).

    python -m benchmarks.kv_ttft --json out.json [--tokens 4096] [--requests 3]

For every link and every codec (``none`` = raw, ``adaptive``) it deploys the trained tiny
Llama (``make-model --train``) with prefill pinned to 127.0.0.2 and decode to 127.0.0.3
(``ray.cluster_utils.Cluster``), sends one warm-up request (the controller learns the
link) and then ``--requests`` prompts of ``--tokens`` tokens of stdlib source one at a
time, streaming, and records per request (each codec is deployed twice per link, in the
order none, adaptive, adaptive, none, and the requests pooled):

- ``ttft_s``: first token at the client. In splitserve the prefill worker samples it and
  it is sent before the KV moves, so it does not depend on the link.
- ``t2_s``: second token at the client: the KV has landed (or the suffix recomputed) and
  the decode worker has run one step. This is the TTFT of a design whose decode worker
  emits the first token (vLLM's and llm-d's P/D), and the figure the KV transfer decides.
- ``kv_wait_s`` = t2 - ttft: what the transfer adds after the prefill (plus one decode
  step). Less noisy than t2 on a shared machine, where the prefill time itself varies.

Links. Literal rates (``1``, ``10`` Gbit/s) move this small model's KV (4 MiB fp32 for 4K
tokens) in milliseconds while the CPU prefill takes about a second: nothing to win. The
``gpuN`` links put this deployment in the regime of Llama-3-8B on an A100 behind an N
Gbit/s link: the rate at which moving the raw KV takes the same multiple of the prefill
time. Reference: 4096 tokens x 128 KiB/token (bf16, GQA 8 KV heads, 32 layers) = 512 MiB;
prefill ~0.4 s (2 x 8e9 params x 4096 tokens = 65.5 TFLOP plus attention, at ~55% of the
A100's 312 TFLOP/s bf16: an estimate, not a measurement). At 1 Gbit/s the raw KV takes
4.3 s = 10.7 prefills; at 10 Gbit/s 1.07.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REF_KV_BYTES = 4096 * 128 * 1024
REF_PREFILL_S = 0.4


def prompt_ids(model_dir: Path, tokens: int) -> list[int]:
    from engine.loader import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids: list[int] = []
    for name in ("argparse.py", "typing.py", "inspect.py", "subprocess.py"):
        ids += tok.encode((Path(sysconfig.get_paths()["stdlib"]) / name).read_text())
        if len(ids) >= 2 * tokens:
            break
    return ids


def manifest(model_dir: Path, codec: str, gbps: float | None, tokens: int, budget_ms: float,
             dtype: str) -> Any:
    from cluster.manifest import parse_manifest

    blocks = tokens // 16 + 16
    return parse_manifest({
        "name": "kvttft", "model": {"path": str(model_dir), "name": "tiny", "dtype": dtype},
        "mode": "disaggregated",
        "pools": {"prefill": {"num_cpus": 1, "nodes": ["127.0.0.2"], "num_kv_blocks": blocks,
                              "max_num_batched_tokens": 512},
                  "decode": {"num_cpus": 1, "nodes": ["127.0.0.3"], "num_kv_blocks": blocks + 8}},
        "kv_cache": {"block_size": 16, "enable_prefix_caching": False},
        "kv_transfer": {"codec": codec, "rate_limit_gbps": gbps, "budget_ms": budget_ms, "timeout_s": 120},
        "slo": {"ttft_ms": budget_ms, "tpot_ms": 100},
        "server": {"request_timeout_s": 300, "token_timeout_s": 120}})


def one_request(url: str, ids: list[int], max_tokens: int = 4) -> dict[str, float]:
    import httpx

    t0 = time.perf_counter()
    times: list[float] = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
            "model": "tiny", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0].get("text") is not None:
                    times.append(time.perf_counter() - t0)
    if len(times) < 2:
        raise RuntimeError(f"expected >= 2 streamed tokens, got {len(times)}")
    return {"ttft_s": times[0], "t2_s": times[1], "kv_wait_s": times[1] - times[0], "e2e_s": times[-1]}


def kv_counters(url: str) -> tuple[float, float]:
    """(bytes sent, raw KV bytes) over all transfers so far, from /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name))

    return total("splitserve_kv_transfer_bytes_total"), total("splitserve_kv_transfer_raw_bytes_total")


def mean_measured(values: Iterable[float | None]) -> float | None:
    """Mean of the runs that measured a value; None when none did. (A run whose counters
    saw no KV bytes has no ratio: counting it as 0 bytes would fake a perfect codec.)"""
    got = [v for v in values if v is not None]
    return statistics.mean(got) if got else None


def run_config(model_dir: Path, ids: list[int], codec: str, gbps: float | None, args: argparse.Namespace,
               budget_ms: float) -> dict[str, Any]:
    import ray

    from cluster.serve import Server, deploy

    dep = deploy(manifest(model_dir, codec, gbps, args.tokens, budget_ms, args.dtype))
    server = Server(dep)
    url = server.start()
    try:
        prefill = ray.get(dep.controller.get_state.remote())["pools"]["prefill"][0]["handle"]
        prompts = [ids[i * 97: i * 97 + args.tokens] for i in range(args.requests + 1)]
        one_request(url, prompts[0])  # warm-up: the link is measured on this one
        before = kv_counters(url)
        rows = [one_request(url, p) for p in prompts[1:]]
        after = kv_counters(url)
        policy = ray.get(prefill.kv_policy.remote())
        kv_bytes, raw_bytes = after[0] - before[0], after[1] - before[1]
    finally:
        server.stop()
        dep.stop()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"codec": codec, "gbps": gbps, "requests": rows, "median": med,
            "bytes_ratio": kv_bytes / raw_bytes if raw_bytes else None, "policy": policy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--links", default="unthrottled,10,1,gpu10,gpu1",
                    help="comma list: unthrottled, N (Gbit/s), gpuN (see the module doc)")
    ap.add_argument("--budget", type=float, default=2.0,
                    help="adaptive budget (and TTFT SLO) as a multiple of the unthrottled prefill time")
    ap.add_argument("--model-dir", help="default: the trained tiny llama (make-model --train, cached)")
    args = ap.parse_args(argv)

    import cluster  # noqa: F401 - Ray environment
    import ray
    from ray.cluster_utils import Cluster

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from models.make import trained_model_dir

        model_dir = trained_model_dir("llama")
    ids = prompt_ids(model_dir, args.tokens)
    if len(ids) < args.tokens + 97 * args.requests:
        print(f"not enough text for {args.tokens}-token prompts", file=sys.stderr)
        return 2
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=1, node_ip_address="127.0.0.2")
    c.add_node(num_cpus=1, node_ip_address="127.0.0.3")
    ray.init(address=c.address, namespace="splitserve-kvttft", log_to_driver=False)
    results: dict[str, Any] = {"tokens": args.tokens, "dtype": args.dtype, "links": {}}
    try:
        base = run_config(model_dir, ids, "none", None, args, budget_ms=60_000)
        prefill_s = base["median"]["ttft_s"]  # sets the gpuN links and the budget
        from engine.config import ModelConfig

        cfg = ModelConfig.from_dir(model_dir)
        itemsize = 4 if args.dtype == "float32" else 2
        kv_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize * args.tokens
        results.update(prefill_s=prefill_s, kv_raw_bytes=kv_bytes, budget_s=args.budget * prefill_s)
        for link in args.links.split(","):
            if link == "unthrottled":
                gbps = None
            elif link.startswith("gpu"):
                ratio = REF_KV_BYTES * 8 / (float(link[3:]) * 1e9) / REF_PREFILL_S
                gbps = kv_bytes * 8 / (ratio * prefill_s) / 1e9
            else:
                gbps = float(link)
            row: dict[str, Any] = {"gbps": gbps}
            # ABBA: the machine is shared and noisy; each codec runs twice, in both orders.
            runs: dict[str, list[dict[str, Any]]] = {"none": [], "adaptive": []}
            for codec in ("none", "adaptive", "adaptive", "none"):
                runs[codec].append(run_config(model_dir, ids, codec, gbps, args,
                                              budget_ms=args.budget * prefill_s * 1000))
            for codec, rs in runs.items():
                reqs = [q for r in rs for q in r["requests"]]
                med = {k: statistics.median(q[k] for q in reqs) for k in reqs[0]}
                row[codec] = {"requests": reqs, "median": med, "policy": rs[-1]["policy"],
                              "bytes_ratio": mean_measured(r["bytes_ratio"] for r in rs)}
                ratio = row[codec]["bytes_ratio"]
                print(f"{link:>12} {codec:>9}: ttft {med['ttft_s']:.3f}s  t2 {med['t2_s']:.3f}s  "
                      f"bytes {'n/a' if ratio is None else f'{ratio:.3f}'} of raw", flush=True)
            row["t2_ratio"] = row["adaptive"]["median"]["t2_s"] / row["none"]["median"]["t2_s"]
            row["ttft_ratio"] = row["adaptive"]["median"]["ttft_s"] / row["none"]["median"]["ttft_s"]
            results["links"][link] = row
    finally:
        ray.shutdown()
        c.shutdown()
    summary = {link: {"gbps": r["gbps"], "raw_t2_s": r["none"]["median"]["t2_s"],
                      "adaptive_t2_s": r["adaptive"]["median"]["t2_s"], "t2_ratio": r["t2_ratio"],
                      "ttft_ratio": r["ttft_ratio"], "adaptive_bytes_ratio": r["adaptive"]["bytes_ratio"],
                      "raw_kv_wait_s": r["none"]["median"]["kv_wait_s"],
                      "adaptive_kv_wait_s": r["adaptive"]["median"]["kv_wait_s"]}
               for link, r in results["links"].items()}
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
