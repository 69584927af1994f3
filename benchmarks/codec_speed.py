"""Encode and decode speed of the KV codecs per core on a real model's KV (issue 19:
>= 100 MB/s per core for every level).

    python -m benchmarks.codec_speed [--codecs int8,cachegen:0-5,kvtc:0-7] [--tokens 512]
        [--repeats 5] [--kv KV.pt] [--profile LABEL] [--json OUT.json]

KV: SmolLM2-135M-Instruct's (the built-in model) KV of the first evaluation window of
``benchmarks.kv_quality`` (prose, 2048 tokens, fp32 compute), cast to bf16 (``--dtype``); ``--kv``
loads a saved ``[layers, 2, tokens, kv_heads, head_dim]`` tensor (or a dict with
"eval": [(kv, ids), ...]) instead of prefilling. One torch thread
(``torch.set_num_threads(1)``); MB/s are fp16-equivalent bytes per second of CPU time of
this thread (``time.thread_time``), the median of ``--repeats``, measured two ways:

- ``slice``: one ``encode`` of the whole ``[layers, 2, tokens, ...]`` slice (how
  ``benchmarks.kv_quality`` measures);
- ``layer``: one ``encode`` per layer of the slice (how a streamed transfer codes it:
  ``kvtransfer.stream``), so per-call overheads count.

Codecs are measured interleaved (every codec once per round, ``--repeats`` rounds), so a
burst of load on the shared machine hits all of them alike. ``--profile LABEL`` prints
cProfile's top functions of that codec's slice encode and decode instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.kv_quality import parse_codecs


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def load_kv(path: str | None, tokens: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    if path:
        d = torch.load(path)
        kv = d["eval"][0][0] if isinstance(d, dict) else d
    else:
        from kvtransfer import kvprobe
        from models.builtin import builtin_model_dir

        probe = kvprobe.Probe(builtin_model_dir("smollm2-135m-instruct"), tokens)
        (_, ids), = kvprobe.windows(probe.tok, "eval", 1, tokens, 0)
        kv = probe.context_kv(ids)[0]
    return kv[:, :, :tokens].to(dtype).contiguous()


def codec_of(label: str, layer: int | None = None, layers: int = 0) -> Any:
    from kvtransfer.codec import get_codec

    name, _, lv = label.partition(":")
    opts: dict[str, Any] = {}
    if lv:
        opts["level"] = int(lv)
    if name == "kvtc":
        opts["calibration"] = _calibration()
    if layer is not None and name in ("cachegen", "kvtc"):
        opts.update(first_layer=layer, total_layers=layers)
    return get_codec(name, **opts)


@functools.lru_cache(maxsize=1)
def _calibration() -> Any:
    from kvtransfer.codecs.kvtc import load_or_calibrate
    from models.builtin import builtin_model_dir

    return load_or_calibrate(builtin_model_dir("smollm2-135m-instruct"))


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.thread_time()
    out = fn()
    return time.thread_time() - t, out


def measure(labels: list[str], kv: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    mb = kv.numel() * 2 / 1e6
    L = kv.shape[0]
    slice_c = {lb: codec_of(lb) for lb in labels}
    layer_c = {lb: [codec_of(lb, i, L) for i in range(L)] for lb in labels}
    times: dict[str, dict[str, list[float]]] = {lb: {k: [] for k in ("se", "sd", "le", "ld")} for lb in labels}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        for lb in labels:
            c = slice_c[lb]
            te, data = _timed(lambda: c.encode(kv))
            td, _ = _timed(lambda: c.decode(data))
            times[lb]["se"].append(te)
            times[lb]["sd"].append(td)
            sizes[lb] = len(data)
            cs = layer_c[lb]
            te, parts = _timed(lambda: [cs[i].encode(kv[i:i + 1]) for i in range(L)])
            td, _ = _timed(lambda: [cs[i].decode(p) for i, p in enumerate(parts)])
            times[lb]["le"].append(te)
            times[lb]["ld"].append(td)
    out = {}
    for lb in labels:
        t = {k: statistics.median(v) for k, v in times[lb].items()}
        out[lb] = {"ratio_vs_fp16": kv.numel() * 2 / sizes[lb],
                   "slice_encode_MBps": mb / t["se"], "slice_decode_MBps": mb / t["sd"],
                   "layer_encode_MBps": mb / t["le"], "layer_decode_MBps": mb / t["ld"]}
    return out


def profile(label: str, kv: torch.Tensor, repeats: int) -> None:
    import cProfile
    import pstats

    c = codec_of(label)
    data = c.encode(kv)
    for what, fn in (("encode", lambda: c.encode(kv)), ("decode", lambda: c.decode(data))):
        pr = cProfile.Profile(time.thread_time)
        pr.enable()
        for _ in range(repeats):
            fn()
        pr.disable()
        print(f"== {label} {what} ({repeats}x)")
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", default="int8,cachegen:0-5,kvtc:0-7")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the KV's dtype (cast from fp32)")
    ap.add_argument("--kv", help="a saved KV tensor (torch.save) instead of a prefill")
    ap.add_argument("--profile", metavar="LABEL")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    kv = load_kv(args.kv, args.tokens, DTYPES[args.dtype])
    if args.profile:
        profile(args.profile, kv, args.repeats)
        return 0
    import os

    load = os.getloadavg()
    res = measure(parse_codecs(args.codecs), kv, args.repeats)
    print(f"KV {tuple(kv.shape)} {args.dtype} ({kv.numel() * 2 / 1e6:.1f} MB fp16-equivalent); load before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| codec | x fp16 | slice enc MB/s | slice dec MB/s | per-layer enc MB/s | per-layer dec MB/s |")
    print("|---|---|---|---|---|---|")
    for lb, r in res.items():
        print(f"| {lb} | {r['ratio_vs_fp16']:.2f} | {r['slice_encode_MBps']:.0f} | {r['slice_decode_MBps']:.0f} | "
              f"{r['layer_encode_MBps']:.0f} | {r['layer_decode_MBps']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": list(kv.shape), "dtype": args.dtype, "load_before": load[0],
                                               "load_after": os.getloadavg()[0], "rows": res}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
