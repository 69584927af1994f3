"""KV codec quality on a real model's KV: size, perplexity, greedy agreement and speed of
every codec and level.

    python -m benchmarks.kv_quality [--model-dir DIR] [--windows 4] [--ctx 2048] [--cont 64]
        [--dtypes bfloat16,float16] [--codecs none,lossless,int8,cachegen:0-5,kvtc:0-7]
        [--gen 0] [--json OUT.json] [--plot OUT.png]

Model: SmolLM2-135M-Instruct (the built-in ``smollm2-135m-instruct``) unless --model-dir.
Texts (``kvtransfer.kvprobe``): evaluation windows alternate prose (``pydoc_data.topics``)
and code (standard-library files), never the texts ``kvtc`` calibrates on. Each window:
the model (fp32) prefills ``ctx`` tokens; its KV is cast to the KV dtype (the reference:
exact KV of that dtype), coded by the codec in chunks of ``--chunk-tokens`` (as transfers
code it) and decoded; the next ``cont`` tokens are scored teacher-forced with the decoded
KV in place of the exact one:

- ``ppl_pct``: perplexity change vs the exact KV, over all windows' scored tokens pooled;
- ``kl``: mean KL(exact || decoded) of the next-token distributions (a low-noise measure
  of the same damage);
- ``greedy_agree``: fraction of the cont positions whose greedy (argmax) token equals the
  exact KV's; with ``--gen N`` also ``gen_first_diff``: free-running greedy tokens until
  the first difference (N tokens each, slow: one forward per token);
- size: ``ratio_vs_fp16`` (fp16 bytes of the KV / coded bytes) and ``ratio_vs_int8``;
- speed: encode and decode MB/s of fp16-equivalent KV per core (CPU time of one thread,
  ``torch.set_num_threads(1)``, median of ``--repeats``) on the first window's KV.

Lossy levels also show the quality cost the adaptive controller uses (``stored_cost_pct``:
the kvtc calibration's stored costs by ``kvtransfer.quality``'s rule, for kvtc and
cachegen levels; a level is admitted at the default floor when it is <= 1%).
``--first-window`` and ``--merge`` split a long run into short ones and pool them. The plot
draws size vs perplexity change beside CacheGen's and KVTC's published size claims (``benchmarks.codec_curve.PUBLISHED``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.codec_curve import PUBLISHED

Row = dict[str, Any]


def parse_codecs(spec: str) -> list[str]:
    """"none,int8,cachegen:0-5,kvtc:2" -> labels."""
    out = []
    for part in spec.split(","):
        name, _, lv = part.partition(":")
        if not lv:
            out.append(name)
        elif "-" in lv:
            a, b = (int(v) for v in lv.split("-"))
            out += [f"{name}:{i}" for i in range(a, b + 1)]
        else:
            out.append(f"{name}:{int(lv)}")
    return out


def make_codec(label: str, model_dir: Path) -> Any:
    from kvtransfer.codec import get_codec

    name, _, lv = label.partition(":")
    opts: dict[str, Any] = {}
    if lv:
        opts["level"] = int(lv)
    if name == "kvtc":
        opts["model"] = model_dir
    return get_codec(name, **opts)


def code(codec: Any, kv: torch.Tensor, chunk: int) -> tuple[int, torch.Tensor]:
    """(coded bytes, decoded KV): token chunks coded independently, like transfers."""
    n, parts = 0, []
    for a in range(0, kv.shape[2], chunk if chunk > 0 else kv.shape[2]):
        c = codec
        if getattr(codec, "name", "") == "kvtc":  # keys before RoPE: the chunk's position
            from kvtransfer.codec import get_codec

            c = get_codec("kvtc", level=codec.level, calibration=codec.calibration, first_token=a)
        data = c.encode(kv[:, :, a:a + chunk] if chunk > 0 else kv)
        n += len(data)
        parts.append(codec.decode(data))
    return n, torch.cat(parts, dim=2)


def speed(codec: Any, kv: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Encode and decode MB/s (fp16-equivalent bytes) per core: CPU time of this thread."""
    mb = kv.numel() * 2 / 1e6
    enc, dec = [], []
    for _ in range(repeats):
        t = time.thread_time()
        data = codec.encode(kv)
        enc.append(time.thread_time() - t)
        t = time.thread_time()
        codec.decode(data)
        dec.append(time.thread_time() - t)
    return mb / max(statistics.median(enc), 1e-9), mb / max(statistics.median(dec), 1e-9)


def run(model_dir: Path, labels: list[str], dtypes: list[str], windows: int, ctx: int, cont: int, gen: int,
        chunk: int, repeats: int, speed_tokens: int, log: Any = None, first_window: int = 0) -> dict[str, Any]:
    from kvtransfer import kvprobe

    probe = kvprobe.Probe(model_dir, ctx + max(cont, gen))
    wins = kvprobe.windows(probe.tok, "eval", first_window + windows, ctx, cont)[first_window:]
    codecs = {lb: make_codec(lb, model_dir) for lb in labels}
    acc: dict[str, dict[str, Row]] = {d: {lb: {"nll": 0.0, "kl": [], "agree": [], "bytes": 0, "first_diff": []}
                                         for lb in labels} for d in dtypes}
    raw: dict[str, Any] = {"fp16_bytes": 0, "ntok": 0, "nll0": {d: 0.0 for d in dtypes}, "acc": acc}
    spd: dict[str, dict[str, tuple[float, float]]] = {d: {} for d in dtypes}
    for wi, (wlabel, ids) in enumerate(wins):
        t0 = time.time()
        kv32, first = probe.context_kv(ids[:ctx])
        raw["fp16_bytes"] += kv32.numel() * 2
        raw["ntok"] += cont - 1
        for d in dtypes:
            kv = kv32.to(getattr(torch, d))
            ref = probe.score(kv, ids[ctx:], keep_logprobs=True)
            g0 = probe.greedy(kv, first, gen) if gen else []
            raw["nll0"][d] += ref.nll
            for lb, codec in codecs.items():
                nbytes, out = code(codec, kv, chunk)
                s = probe.score(out, ids[ctx:], keep_logprobs=True)
                a = acc[d][lb]
                a["nll"] += s.nll
                a["bytes"] += nbytes
                a["kl"].append(kvprobe.kl(ref, s))
                a["agree"].append(sum(x == y for x, y in zip(s.argmax, ref.argmax)) / len(ref.argmax))
                if gen:
                    g = probe.greedy(out, first, gen)
                    same = [x == y for x, y in zip(g, g0)]
                    a["first_diff"].append(same.index(False) if False in same else gen)
                if wi == 0 and repeats > 0:
                    spd[d][lb] = speed(codec, kv[:, :, :speed_tokens], repeats)
        if log:
            log(f"window {wi + 1}/{len(wins)} {wlabel}: {time.time() - t0:.0f}s")
    out: dict[str, Any] = {"model_dir": str(model_dir), "windows": [w for w, _ in wins], "ctx": ctx, "cont": cont,
                           "gen": gen, "chunk_tokens": chunk, "raw": raw,
                           "speed": {d: {lb: list(v) for lb, v in spd[d].items()} for d in dtypes},
                           "stored_cost": stored_costs(labels, codecs)}
    return finish(out)


def stored_costs(labels: list[str], codecs: dict[str, Any]) -> dict[str, float]:
    """The quality cost the adaptive controller uses for each lossy label (fraction): the
    kvtc calibration's stored costs (``KVTCCalibration.costs()``: kvtc and cachegen levels,
    one rule), else ``kvtransfer.adaptive.QUALITY_LOSS``."""
    from kvtransfer.adaptive import expected_quality_loss, parse_label

    cal = next((c.calibration for lb, c in codecs.items() if lb.startswith("kvtc")), None)
    measured = cal.costs() if cal is not None else None
    return {lb: expected_quality_loss(*parse_label(lb), measured) for lb in labels
            if lb not in ("none", "lossless")}


def finish(res: dict[str, Any]) -> dict[str, Any]:
    """Rows (ratios, ppl, KL, agreement, speed) and targets from the pooled sums in res["raw"]."""
    raw = res["raw"]
    ntok, fp16_bytes = raw["ntok"], raw["fp16_bytes"]
    res["rows"] = {}
    for d, acc_d in raw["acc"].items():
        rows: dict[str, Row] = {}
        int8 = acc_d.get("int8", {}).get("bytes") or None
        nll0 = raw["nll0"][d]
        for lb, a in acc_d.items():
            r: Row = {"ratio_vs_fp16": fp16_bytes / a["bytes"],
                      "ratio_vs_int8": (int8 / a["bytes"]) if int8 else None,
                      "ppl_pct": 100 * (math.exp((a["nll"] - nll0) / ntok) - 1),
                      "kl": statistics.fmean(a["kl"]), "greedy_agree": statistics.fmean(a["agree"])}
            if a["first_diff"]:
                r["gen_first_diff"] = statistics.fmean(a["first_diff"])
            if lb in res.get("speed", {}).get(d, {}):
                r["encode_MBps"], r["decode_MBps"] = res["speed"][d][lb]
            if lb in res.get("stored_cost", {}):
                r["stored_cost_pct"] = 100 * res["stored_cost"][lb]
            rows[lb] = r
        res["rows"][d] = rows
        res[f"ppl_exact_{d}"] = math.exp(nll0 / ntok)
    res["targets"] = targets(res)
    return res


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the sums of runs over different windows (same model, codecs, dtypes, ctx):
    ``--first-window`` splits one long run into several short ones."""
    out = json.loads(json.dumps(parts[0]))
    raw = out["raw"]
    for p in parts[1:]:
        if (p["ctx"], p["cont"], p["chunk_tokens"]) != (out["ctx"], out["cont"], out["chunk_tokens"]):
            raise ValueError("runs to merge differ in ctx, cont or chunk tokens")
        out["windows"] += p["windows"]
        r = p["raw"]
        raw["fp16_bytes"] += r["fp16_bytes"]
        raw["ntok"] += r["ntok"]
        for d, acc_d in r["acc"].items():
            raw["nll0"][d] += r["nll0"][d]
            for lb, a in acc_d.items():
                b = raw["acc"][d][lb]
                b["nll"] += a["nll"]
                b["bytes"] += a["bytes"]
                for k in ("kl", "agree", "first_diff"):
                    b[k] += a[k]
        for d, sp in p.get("speed", {}).items():
            for lb, v in sp.items():
                out.setdefault("speed", {}).setdefault(d, {}).setdefault(lb, v)
    return finish(out)


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's done-when figures per dtype: the smallest level within 2% and its ratio
    vs int8 (target >= 3.5), the smallest within 1% and its ratio vs fp16 (target >= 8)."""
    out = {}
    for d, rows in res["rows"].items():
        lossy = {k: r for k, r in rows.items() if ":" in k}
        best2 = max((k for k, r in lossy.items() if r["ppl_pct"] <= 2), default=None,
                    key=lambda k: lossy[k]["ratio_vs_fp16"])
        best1 = max((k for k, r in lossy.items() if r["ppl_pct"] <= 1), default=None,
                    key=lambda k: lossy[k]["ratio_vs_fp16"])
        out[d] = {"within_2pct": best2, "within_2pct_ratio_vs_int8": lossy[best2]["ratio_vs_int8"] if best2 else None,
                  "within_1pct": best1, "within_1pct_ratio_vs_fp16": lossy[best1]["ratio_vs_fp16"] if best1 else None}
        # the quality floor of the adaptive controller (default 1%): the levels its stored
        # costs admit, and whether any of them measured above the floor on these windows
        admitted = {k: r["ppl_pct"] for k, r in rows.items() if r.get("stored_cost_pct", 0.0) <= 1.0}
        out[d]["admitted_at_1pct"] = admitted
        out[d]["admitted_above_1pct"] = [k for k, v in admitted.items() if v > 1.0]
    return out


def table(res: dict[str, Any]) -> str:
    lines = []
    for d, rows in res["rows"].items():
        lines.append(f"\n{d} KV (exact ppl {res[f'ppl_exact_{d}']:.3f}; {len(res['windows'])} windows of "
                     f"{res['ctx']}+{res['cont']} tokens)\n")
        lines.append("| codec | x fp16 | x int8 | ppl | KL | greedy agree | enc MB/s | dec MB/s | stored cost |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for lb, r in rows.items():
            i8 = f"{r['ratio_vs_int8']:.2f}" if r.get("ratio_vs_int8") else "-"
            sp = (f"{r['encode_MBps']:.0f} | {r['decode_MBps']:.0f}" if "encode_MBps" in r else "- | -")
            cal = f"{r['stored_cost_pct']:.2f}%" if r.get("stored_cost_pct") is not None else ""
            lines.append(f"| {lb} | {r['ratio_vs_fp16']:.2f} | {i8} | {r['ppl_pct']:+.2f}% | {r['kl']:.4f} | "
                         f"{r['greedy_agree']:.3f} | {sp} | {cal} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dts = list(res["rows"])
    fig, axes = plt.subplots(1, len(dts), figsize=(6.5 * len(dts), 5), squeeze=False)
    for ax, d in zip(axes[0], dts):
        rows = res["rows"][d]
        fams: dict[str, list[tuple[float, float, str]]] = {}
        for lb, r in rows.items():
            fams.setdefault(lb.split(":")[0], []).append((r["ratio_vs_fp16"], r["ppl_pct"], lb))
        for i, (fam, pts) in enumerate(sorted(fams.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "D", color=f"C{i}",
                    label=fam)
            for x, y, lb in pts:
                if ":" in lb:
                    ax.annotate(lb.split(":")[1], (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        cg, kv = PUBLISHED["cachegen_sigcomm24"], PUBLISHED["kvtc_2025"]
        ax.axvspan(*cg["ratio_vs_fp16"], color="C0", alpha=0.12, label=cg["label"] + " (size only)")
        ax.axvline(kv["ratio_vs_fp16"][0], color="C2", ls=":", lw=2, label=kv["label"] + " (size only)")
        for y in (1, 2):
            ax.axhline(y, color="0.5", lw=0.8, ls="--")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(0.9, 30)
        ax.set_ylim(-3, 20)
        ax.set_xlabel("compression ratio vs fp16 (log)")
        ax.set_ylabel("perplexity change vs exact KV (%)")
        ax.set_title(f"{Path(res['model_dir']).name}, {d} KV")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="model (default: built-in smollm2-135m-instruct)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--first-window", type=int, default=0,
                    help="skip the first N evaluation windows (split a long run; --merge pools the parts)")
    ap.add_argument("--merge", metavar="A.json,B.json", help="pool runs over different windows (no model run)")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--gen", type=int, default=0, help="free-running greedy tokens compared (slow; 0: skip)")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--codecs", default="none,lossless,int8,cachegen:0-5,kvtc:0-7")
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="speed repeats (0: skip speed)")
    ap.add_argument("--speed-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model runs")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    ap.add_argument("--plot", metavar="PATH", help="PNG of size vs perplexity")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from models.builtin import builtin_model_dir

        model_dir = builtin_model_dir("smollm2-135m-instruct")
    quiet = args.json == "-"
    if args.merge:
        res = merge([json.loads(Path(p).read_text()) for p in args.merge.split(",")])
    else:
        res = run(model_dir, parse_codecs(args.codecs), args.dtypes.split(","), args.windows, args.ctx, args.cont,
                  args.gen, args.chunk_tokens, args.repeats, args.speed_tokens,
                  log=None if quiet else (lambda m: print(m, flush=True)), first_window=args.first_window)
    if args.plot:
        res["plot"] = str(plot(res, args.plot))
    if args.json:
        text = json.dumps(res, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if not quiet:
        print(table(res))
        print(json.dumps(res["targets"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
