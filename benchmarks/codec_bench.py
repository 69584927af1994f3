"""KV codec measurements on real KV: a model prefills a stretch of the standard library's
source; each codec encodes the exported KV. Sizes relative to raw (and to int8),
reconstruction error, and encode/decode MB/s of raw KV on one core.

    python -m benchmarks.codec_bench --json [--models tiny-llama,small-llama] [--tokens 2000]

Note: the built-in models have random weights; `make-model --train` gives a trained one
(pass its directory with --model-dir) whose KV statistics are closer to a real model's."""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from kvtransfer.codec import get_codec


def real_kv(model_dir: Path, dtype: str, tokens: int) -> torch.Tensor:
    from engine.engine import LLMEngine
    from engine.loader import load_tokenizer
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = load_tokenizer(model_dir).encode(text)[:tokens]
    eng = LLMEngine.from_model_dir(model_dir, dtype=dtype, num_blocks=tokens // 16 + 2, block_size=16,
                                   scheduler_config=SchedulerConfig(max_num_batched_tokens=tokens,
                                                                    max_model_len=8192, prefill_only=True))
    eng.add_request("r", ids, SamplingParams(temperature=0, max_tokens=1))
    return eng.step().exported_kv["r"]


def measure(kv: torch.Tensor, name: str, repeats: int = 3) -> dict[str, float]:
    codec = get_codec(name)
    raw = kv.numel() * kv.element_size()
    data = codec.encode(kv)
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        data = codec.encode(kv)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = codec.decode(data)
        dec.append(time.perf_counter() - t)
    err = (out.float() - kv.float())
    return {"bytes": len(data), "ratio_vs_raw": raw / len(data),
            "rel_l2": float(err.norm() / kv.float().norm()), "max_abs": float(err.abs().max()),
            "encode_MBps": raw / statistics.median(enc) / 1e6, "decode_MBps": raw / statistics.median(dec) / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models", default="tiny-llama,small-llama", help="builtin models")
    ap.add_argument("--model-dir", action="append", default=[], help="extra model directories")
    ap.add_argument("--tokens", type=int, default=2000)
    args = ap.parse_args(argv)
    from cluster.builtin_models import builtin_model_dir

    torch.set_num_threads(1)
    dirs = [(m, builtin_model_dir(m)) for m in args.models.split(",") if m] + [(d, Path(d)) for d in args.model_dir]
    results: dict[str, dict[str, object]] = {}
    for label, d in dirs:
        for dtype in ("bfloat16", "float16"):
            kv = real_kv(d, dtype, args.tokens)
            row: dict[str, object] = {"shape": list(kv.shape)}
            for name in ("none", "lossless", "int8"):
                row[name] = measure(kv, name)
            int8 = row["int8"]["bytes"]  # type: ignore[index]
            for name in ("none", "lossless", "int8"):
                row[name]["ratio_vs_int8"] = int8 / row[name]["bytes"]  # type: ignore[index]
            results[f"{label}/{dtype}"] = row
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, row in results.items():
            for name in ("none", "lossless", "int8"):
                r = row[name]  # type: ignore[index]
                print(f"{key:28s} {name:9s} x{r['ratio_vs_raw']:.3f} err {r['rel_l2']:.4f} "
                      f"enc {r['encode_MBps']:.0f} MB/s dec {r['decode_MBps']:.0f} MB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
