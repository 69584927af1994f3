"""KV codec measurements: size, error, speed and model quality of every codec and level.

    python -m benchmarks.codec_bench --json [OUT.json] [--plot CURVE.png] [--tokens 2000] [--chunk-tokens 0]
                                     [--quality-windows 32]

For each codec/level: bytes relative to fp16 and to int8 (of the same KV), reconstruction
error (relative L2, max abs), encode and decode MB/s of fp16-equivalent KV on one core
(``torch.set_num_threads(1)``), on

- ``synthetic``: KV with the structure of a real model's: a latent token process with
  token-wise locality (AR(1)), keys with RoPE and a few outlier channels, layer-dependent
  scale; a Llama-like shape ([8 layers, 2, tokens, 8 kv_heads, 128]);
- ``trained``: KV of the tiny model trained in-repo (``make-model --train``) prefilling the
  standard library's ``argparse.py``; calibrated tables come from another file
  (``difflib.py``), never from the KV they are measured on.

``quality``: the trained model prefills held-out windows (``ctx`` tokens), the KV is
replaced by decode(encode(KV)), then (a) perplexity of the next ``cont`` tokens (teacher
forced) and (b) greedy agreement over ``gen`` generated tokens (fraction of positions equal
to the exact-KV run, and mean first-divergence index), against exact KV.

``summary``: the figures the KV-transfer issue asks for (trained model, default level), the
size/quality curve (``curve``: ratio vs fp16 against perplexity change of every cachegen
level, shipped / calibrated / PCA tables, int8 and lossless) and the published reference
points it is drawn against (``published``: CacheGen 3.5-4.3x smaller than 8-bit
quantisation, KVTC up to 20x smaller than 16-bit, both headline claims of the papers'
abstracts, see PUBLISHED). ``--plot PATH`` draws the curve as a PNG (matplotlib, Agg).

Codecs: ``none``, ``lossless`` (table, and range coded), ``int8``, ``cachegen`` levels 0..5
with tables shipped per stream (``cg``) and calibrated once per model (``cgcal``; the
calibration keeps KVTC's PCA at the levels where it wins, ``pca`` in the row says so),
and ``cgpca`` (PCA forced on every level) for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.codec_curve import FAMILIES, PUBLISHED, curve_points, plot_curve  # noqa: F401 - re-exported
from kvtransfer.codec import KVCodec, decode_chunks, encode_chunks, get_codec

Row = dict[str, Any]


def synthetic_kv(layers: int = 8, tokens: int = 512, heads: int = 8, dim: int = 128, seed: int = 0,
                 token_seed: int = 0, rho: float = 0.95, rank: int = 64) -> torch.Tensor:
    """float32 [layers, 2, tokens, heads, dim] with token locality, RoPE'd keys with outlier
    channels and layer-dependent scale (see the module docstring). seed fixes the "model"
    (projections, outlier channels), token_seed the "text"."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.Generator().manual_seed(10_000 + token_seed)
    out = torch.empty(layers, 2, tokens, heads, dim)
    inv = 10000.0 ** (-torch.arange(0, dim, 2).float() / dim)
    ang = torch.arange(tokens).float()[:, None] * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, D/2]
    for layer in range(layers):
        eps = torch.randn(tokens, rank, generator=gt)
        h = torch.empty(tokens, rank)
        h[0] = eps[0]
        for t in range(1, tokens):  # AR(1): smooth latent state
            h[t] = rho * h[t - 1] + math.sqrt(1 - rho * rho) * eps[t]
        h = h + 0.45 * torch.randn(tokens, rank, generator=gt)  # token-specific part
        scale = 1.0 + 0.25 * layer
        for j in range(2):
            w = torch.randn(rank, heads * dim, generator=g) / math.sqrt(rank)
            x = (h @ w).view(tokens, heads, dim)
            if j == 0:
                gain = torch.ones(heads, dim)
                idx = torch.randint(0, dim, (heads, 4), generator=g)
                gain.scatter_(1, idx, 6.0)  # outlier channels of keys
                x = x * gain + 0.5 * torch.randn(heads, dim, generator=g)
                x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
                x = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
            out[layer, j] = x * scale
    return out


def real_kv(model_dir: Path, dtype: str, tokens: int, text_file: str = "argparse.py") -> torch.Tensor:
    """KV [layers, 2, tokens, kv_heads, head_dim] of the model prefilling a stdlib file."""
    from engine.engine import LLMEngine
    from engine.loader import load_tokenizer
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    text = (Path(sysconfig.get_paths()["stdlib"]) / text_file).read_text()
    ids = load_tokenizer(model_dir).encode(text)[:tokens]
    eng = LLMEngine.from_model_dir(model_dir, dtype=dtype, num_blocks=tokens // 16 + 2, block_size=16,
                                   scheduler_config=SchedulerConfig(max_num_batched_tokens=tokens,
                                                                    max_model_len=max(8192, tokens),
                                                                    prefill_only=True))
    eng.add_request("r", ids, SamplingParams(temperature=0, max_tokens=1))
    out: torch.Tensor = eng.step().exported_kv["r"]
    return out


Coder = tuple[Callable[[torch.Tensor], bytes], Callable[[bytes], torch.Tensor]]


def coder(codec: KVCodec, chunk_tokens: int) -> Coder:
    if chunk_tokens <= 0:
        return codec.encode, codec.decode
    return (lambda kv: encode_chunks(kv, chunk_tokens, codec)), decode_chunks


def _decoder_with(codec: KVCodec, chunk_tokens: int) -> Coder:
    """Like coder, but chunk streams are decoded by this codec (calibrated tables)."""
    from kvtransfer.codec import split_chunks

    if chunk_tokens <= 0:
        return codec.encode, codec.decode
    return ((lambda kv: encode_chunks(kv, chunk_tokens, codec)),
            (lambda data: torch.cat([codec.decode(p) for p in split_chunks(data)], dim=2)))


def measure(kv: torch.Tensor, enc_dec: Coder, repeats: int) -> Row:
    """Size, error and speed; MB/s of fp16-equivalent KV from the median wall-clock time
    (``encode_MBps``) and from the median CPU time of this thread (``encode_MBps_cpu``:
    per-core speed, unaffected by other processes taking the core away)."""
    enc, dec = enc_dec
    fp16_bytes = kv.numel() * 2
    data, out = enc(kv), None
    t_enc, t_dec, c_enc, c_dec = [], [], [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.thread_time()
        data = enc(kv)
        c_enc.append(time.thread_time() - c)
        t_enc.append(time.perf_counter() - t)
        t, c = time.perf_counter(), time.thread_time()
        out = dec(data)
        c_dec.append(time.thread_time() - c)
        t_dec.append(time.perf_counter() - t)
    assert out is not None
    err = out.float() - kv.float()
    finite = torch.isfinite(kv.float())

    def mbps(ts: list[float]) -> float:
        return fp16_bytes / max(statistics.median(ts), 1e-9) / 1e6

    return {"bytes": len(data), "ratio_vs_fp16": fp16_bytes / len(data),
            "rel_l2": float(err[finite].norm() / kv.float()[finite].norm().clamp_min(1e-30)),
            "max_abs": float(err[finite].abs().max()),
            "encode_MBps": mbps(t_enc), "decode_MBps": mbps(t_dec),
            "encode_MBps_cpu": mbps(c_enc), "decode_MBps_cpu": mbps(c_dec)}


def codec_set(calib: list[torch.Tensor] | None, levels: range) -> dict[str, KVCodec]:
    """Label -> codec: the exact ones, int8, and cachegen shipped / calibrated / PCA."""
    from kvtransfer.codecs.cachegen import calibrate

    out: dict[str, KVCodec] = {"none": get_codec("none"), "lossless": get_codec("lossless"),
                               "lossless-range": get_codec("lossless", entropy="range"), "int8": get_codec("int8")}
    out.update({f"cg{lv}": get_codec("cachegen", level=lv) for lv in levels})
    if calib:
        auto = calibrate(calib, levels=tuple(levels), transform="auto")
        pca = calibrate(calib, levels=tuple(levels), transform="pca")
        out.update({f"cgcal{lv}": get_codec("cachegen", level=lv, tables=auto) for lv in levels})
        out.update({f"cgpca{lv}": get_codec("cachegen", level=lv, tables=pca) for lv in levels})
    return out


def size_table(kv: torch.Tensor, codecs: dict[str, KVCodec], chunk_tokens: int, repeats: int) -> dict[str, Row]:
    from kvtransfer.codecs.cachegen import CacheGenCodec, describe

    rows: dict[str, Row] = {}
    for label, codec in codecs.items():
        if label != "lossless" and label.startswith(("none", "lossless")) and kv.dtype == torch.float32:
            continue
        rows[label] = measure(kv, _decoder_with(codec, chunk_tokens), repeats)
        if isinstance(codec, CacheGenCodec):
            rows[label]["pca"] = codec._pca()
            parts = describe(codec.encode(kv[:, :, :chunk_tokens] if chunk_tokens > 0 else kv))
            rows[label]["side_info_share"] = 1 - parts["words"] / sum(parts.values())
    int8 = rows["int8"]["bytes"]
    for r in rows.values():
        r["ratio_vs_int8"] = int8 / r["bytes"]
    return rows


def quality(model_dir: Path, dtype: torch.dtype, codecs: dict[str, KVCodec], windows: int, ctx: int, cont: int,
            gen: int) -> dict[str, Row]:
    """Perplexity and greedy agreement with decode(encode(KV)) against exact KV."""
    from models.train import corpus_tokens
    from engine.attention_metadata import AttentionMetadata
    from engine.loader import load_model, load_tokenizer
    from engine.model import allocate_kv_cache
    from engine.runner import ModelRunner, StepInput, _slots

    _, held = corpus_tokens(load_tokenizer(model_dir))
    model = load_model(model_dir, dtype)
    bs = 16
    nb = (ctx + max(cont, gen)) // bs + 2
    runner = ModelRunner(model, allocate_kv_cache(model.cfg, nb, bs, dtype), bs)
    table = list(range(nb))

    def forward(ids: list[int], start: int, all_logits: bool) -> torch.Tensor:
        end = start + len(ids)
        meta = AttentionMetadata([len(ids)], [end], [table], _slots(table, start, end, bs), bs)
        rows = torch.arange(len(ids)) if all_logits else torch.tensor([len(ids) - 1])
        logits = runner.execute(StepInput(torch.tensor(ids), torch.arange(start, end), meta, rows)).logits
        assert logits is not None
        return logits.float()

    stats: dict[str, dict[str, list[float]]] = {k: {"nll": [], "agree": [], "first_diff": []}
                                                for k in ["exact", *codecs]}
    stride = max(ctx + cont, (len(held) - ctx - cont) // max(1, windows))
    for w in range(windows):
        ids = held[w * stride: w * stride + ctx + cont].tolist()
        first = int(forward(ids[:ctx], 0, False).argmax())
        kv = runner.export_kv(table, ctx)

        def run(kv2: torch.Tensor) -> tuple[float, list[int]]:
            runner.import_kv(table, kv2)
            logits = forward(ids[ctx:], ctx, True)
            nll = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[ctx + 1:]), reduction="sum"))
            runner.import_kv(table, kv2)  # the continuation overwrote nothing before ctx; greedy from ctx
            out = [first]
            for i in range(gen - 1):
                out.append(int(forward([out[-1]], ctx + i, False).argmax()))
            return nll, out

        nll0, greedy0 = run(kv)
        for label, codec in [("exact", None), *codecs.items()]:
            nll, greedy = (nll0, greedy0) if codec is None else run(codec.decode(codec.encode(kv)))
            same = [a == b for a, b in zip(greedy, greedy0)]
            stats[label]["nll"].append(nll)
            stats[label]["agree"].append(float(np.mean(same)))
            stats[label]["first_diff"].append(float(same.index(False)) if False in same else float(gen))
    n = windows * (cont - 1)
    ppl0 = math.exp(sum(stats["exact"]["nll"]) / n)
    out: dict[str, Row] = {}
    for label, s in stats.items():
        ppl = math.exp(sum(s["nll"]) / n)
        out[label] = {"ppl": ppl, "ppl_vs_exact_pct": 100 * (ppl / ppl0 - 1),
                      "greedy_agree": float(np.mean(s["agree"])), "greedy_first_diff": float(np.mean(s["first_diff"]))}
    return out


def summary(results: dict[str, Any], dtypes: list[str]) -> dict[str, Any]:
    """The issue's figures: lossless vs raw, cachegen default level vs int8 with its
    perplexity change, the size/quality curve, throughputs."""
    from kvtransfer.codecs.cachegen import DEFAULT_LEVEL

    out: dict[str, Any] = {"default_level": DEFAULT_LEVEL, "published": PUBLISHED}
    for dtype in dtypes:
        rows = results.get(f"trained/{dtype}", {}).get("codecs", {})
        quality = results.get(f"quality/{dtype}", {})
        if not rows:
            continue
        d = f"cg{DEFAULT_LEVEL}"
        out[dtype] = {
            "lossless_ratio_vs_raw": rows["lossless"]["ratio_vs_fp16"],
            "lossless_MBps": [rows["lossless"]["encode_MBps"], rows["lossless"]["decode_MBps"]],
            "cachegen_default_ratio_vs_int8": rows[d]["ratio_vs_int8"],
            "cachegen_default_calibrated_ratio_vs_int8": rows.get(f"cgcal{DEFAULT_LEVEL}", {}).get("ratio_vs_int8"),
            "cachegen_default_ppl_vs_exact_pct": quality.get(d, {}).get("ppl_vs_exact_pct"),
            "cachegen_default_MBps": [rows[d]["encode_MBps"], rows[d]["decode_MBps"]],
            "cachegen_MBps_by_level": {k: [r["encode_MBps"], r["decode_MBps"]] for k, r in rows.items()
                                       if k.rstrip("0123456789") == "cg"},
            "curve": curve_points(rows, quality),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="print one JSON object (to PATH when given, else stdout)")
    ap.add_argument("--plot", metavar="PATH",
                    help="PNG of the size/perplexity curve (default: next to the --json file as <stem>_curve.png, "
                         "else ./codec_curve.png); 'none' to skip")
    ap.add_argument("--tokens", type=int, default=2000, help="prompt tokens of the trained model's KV")
    ap.add_argument("--synthetic-tokens", type=int, default=512)
    ap.add_argument("--chunk-tokens", type=int, default=0, help="code token chunks independently (0: whole KV)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--quality-windows", type=int, default=32, help="held-out windows (0: skip quality)")
    ap.add_argument("--ctx", type=int, default=192, help="context tokens per quality window")
    ap.add_argument("--cont", type=int, default=64, help="scored continuation tokens per window")
    ap.add_argument("--gen", type=int, default=64, help="greedy tokens compared per window")
    ap.add_argument("--model-dir", help="trained model (default: make-model --train, cached)")
    ap.add_argument("--skip-synthetic", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    levels = range(6)
    results: dict[str, Any] = {"chunk_tokens": args.chunk_tokens}
    for dtype in args.dtypes.split(","):
        if not args.skip_synthetic:
            syn = synthetic_kv(tokens=args.synthetic_tokens).to(getattr(torch, dtype))
            calib = [synthetic_kv(tokens=args.synthetic_tokens, token_seed=1).to(getattr(torch, dtype))]
            results[f"synthetic/{dtype}"] = {"shape": list(syn.shape), "codecs": size_table(
                syn, codec_set(calib, levels), args.chunk_tokens, args.repeats)}
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            from models.make import trained_model_dir

            model_dir = trained_model_dir("llama")
        kv = real_kv(model_dir, dtype, args.tokens)
        calib = [real_kv(model_dir, dtype, args.tokens, "difflib.py")]
        codecs = codec_set(calib, levels)
        results[f"trained/{dtype}"] = {"shape": list(kv.shape), "codecs": size_table(
            kv, codecs, args.chunk_tokens, args.repeats)}
        if args.quality_windows > 0:
            lossy = {k: c for k, c in codecs.items() if k in ("int8", "lossless") or k.startswith("cg")}
            results[f"quality/{dtype}"] = quality(model_dir, getattr(torch, dtype), lossy, args.quality_windows,
                                                  args.ctx, args.cont, args.gen)
    results["summary"] = summary(results, args.dtypes.split(","))
    plot = args.plot
    if plot is None:
        plot = str(Path(args.json).with_name(Path(args.json).stem + "_curve.png")) if args.json not in (None, "-") \
            else "codec_curve.png"
    if plot != "none":
        results["summary"]["plot"] = str(plot_curve(results["summary"], plot))
    if args.json:
        text = json.dumps(results, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
        return 0
    for key, block in results.items():
        if key.startswith(("synthetic", "trained")):
            for label, r in block["codecs"].items():
                print(f"{key:20s} {label:15s} x{r['ratio_vs_fp16']:6.2f} fp16 x{r['ratio_vs_int8']:5.2f} int8 "
                      f"rel {r['rel_l2']:.4f} max {r['max_abs']:.3g} enc {r['encode_MBps']:6.0f} "
                      f"dec {r['decode_MBps']:6.0f} MB/s (cpu {r['encode_MBps_cpu']:.0f}/{r['decode_MBps_cpu']:.0f})"
                      f"{'  pca' if r.get('pca') else ''}")
        elif key.startswith("quality"):
            for label, r in block.items():
                print(f"{key:20s} {label:15s} ppl {r['ppl']:.3f} ({r['ppl_vs_exact_pct']:+.2f}%) "
                      f"greedy agree {r['greedy_agree']:.3f} first diff {r['greedy_first_diff']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
