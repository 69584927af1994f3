"""The size-against-quality curve of the KV codecs (``benchmarks.codec_bench``): its points,
the published reference claims drawn beside them, and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Row = dict[str, Any]


# Published reference points for the size/quality curve. Only what could be cited is
# here; the papers' per-model evaluation tables could not be read from this machine (no
# access to the PDFs), so both points are the papers' headline claims from their
# abstracts, and neither gives a perplexity change: they are drawn as size markers (a
# vertical band / line across the quality axis), not as (size, perplexity) points.
PUBLISHED: dict[str, dict[str, Any]] = {
    # CacheGen: Liu et al., "CacheGen: KV Cache Compression and Streaming for Fast Large
    # Language Model Serving", ACM SIGCOMM 2024, pp. 38-56 (arXiv:2310.07240). Abstract:
    # "reduces the KV cache size by 3.5-4.3x ... compared to the recent systems that reuse
    # the KV cache ... with negligible impact on the LLM response quality in accuracy or
    # perplexity". The baseline is 8-bit quantisation (as the KV-transfer issue states it),
    # taken as 2x smaller than fp16, so 7.0-8.6x vs fp16. Quality: "negligible" (no number).
    "cachegen_sigcomm24": {
        "label": "CacheGen (SIGCOMM'24): 3.5-4.3x vs 8-bit quant.",
        "ratio_vs_fp16": [2 * 3.5, 2 * 4.3],
        "ratio_vs_int8": [3.5, 4.3],
        "quality": "negligible impact on accuracy or perplexity (abstract; no per-model number used)",
        "source": "arXiv:2310.07240 abstract (SIGCOMM 2024)",
    },
    # KVTC: Staniszewski and Lancucki, "KV Cache Transform Coding for Compact Storage in LLM
    # Inference", arXiv:2511.01815 (2025; ICLR 2026). Abstract: "achieves up to 20x
    # compression while maintaining reasoning and long-context accuracy, and 40x or higher
    # for specific use cases" (Llama 3, Mistral NeMo, R1-Qwen 2.5; accuracy on AIME25,
    # GSM8K, LiveCodeBench, LongBench, MATH-500, MMLU, Qasper, RULER). Compression is of
    # the 16-bit KV cache. Quality: "maintaining accuracy" (no number).
    "kvtc_2025": {
        "label": "KVTC (2025): up to 20x (40x some uses)",
        "ratio_vs_fp16": [20.0],
        "ratio_vs_fp16_some_uses": 40.0,
        "quality": "maintains reasoning and long-context accuracy (abstract; no per-model number used)",
        "source": "arXiv:2511.01815 abstract",
    },
}

# Curve families: label prefix -> (legend, marker).
FAMILIES = {"cg": "cachegen, tables shipped", "cgcal": "cachegen, calibrated (PCA where it wins)",
            "cgpca": "cachegen, calibrated + PCA every level"}


def curve_points(rows: dict[str, Row], quality: dict[str, Row]) -> list[Row]:
    """Size (x: ratio vs fp16) against perplexity change (y: % vs exact KV) of every
    cachegen level of every family, int8 and lossless; y is None without a quality run."""
    out = []
    for label, r in rows.items():
        family = label.rstrip("0123456789")
        if family not in FAMILIES and label not in ("int8", "lossless"):
            continue
        level = int(label[len(family):]) if family in FAMILIES else None
        q = quality.get(label, {})
        out.append({"codec": label, "family": family if family in FAMILIES else label, "level": level,
                    "pca": r.get("pca"), "ratio_vs_fp16": r["ratio_vs_fp16"], "ratio_vs_int8": r["ratio_vs_int8"],
                    "rel_l2": r["rel_l2"], "ppl_vs_exact_pct": q.get("ppl_vs_exact_pct"),
                    "greedy_agree": q.get("greedy_agree")})
    return out


def plot_curve(summ: dict[str, Any], path: str | Path) -> Path:
    """PNG of the size/quality curve of every dtype in the summary, with the published
    reference points (see PUBLISHED). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [k for k, v in summ.items() if isinstance(v, dict) and "curve" in v]
    fig, axes = plt.subplots(1, max(1, len(dtypes)), figsize=(6.5 * max(1, len(dtypes)), 5), squeeze=False)
    styles = {"cg": ("o-", "C0"), "cgcal": ("s-", "C1"), "cgpca": ("^--", "C2"), "int8": ("D", "C3"),
              "lossless": ("*", "C4")}
    for ax, dtype in zip(axes[0], dtypes or [""]):
        pts = summ[dtype]["curve"] if dtype else []
        top = max([p["ppl_vs_exact_pct"] for p in pts if p["ppl_vs_exact_pct"] is not None] + [1.0])
        for fam, (fmt, color) in styles.items():
            sel = sorted((p for p in pts if p["family"] == fam and p["ppl_vs_exact_pct"] is not None),
                         key=lambda p: p["ratio_vs_fp16"])
            if not sel:
                continue
            xs, ys = [p["ratio_vs_fp16"] for p in sel], [p["ppl_vs_exact_pct"] for p in sel]
            ax.plot(xs, ys, fmt, color=color, label=FAMILIES.get(fam, fam), markersize=8 if fam in FAMILIES else 11)
            for p in sel:
                if p["level"] is not None and fam == "cg":
                    ax.annotate(f"L{p['level']}", (p["ratio_vs_fp16"], p["ppl_vs_exact_pct"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 4))
        cg = PUBLISHED["cachegen_sigcomm24"]
        ax.axvspan(*cg["ratio_vs_fp16"], color="C0", alpha=0.12, label=cg["label"] + " (size only)")
        kv = PUBLISHED["kvtc_2025"]
        ax.axvline(kv["ratio_vs_fp16"][0], color="C2", ls=":", lw=2, label=kv["label"] + " (size only)")
        ax.axvline(kv["ratio_vs_fp16_some_uses"], color="C2", ls=":", lw=1)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(0.9, 50)
        ax.set_ylim(-0.05 * top, 1.1 * top)
        ax.set_xlabel("compression ratio vs fp16 (log)")
        ax.set_ylabel("perplexity increase vs exact KV (%)")
        ax.set_title(f"trained tiny llama, {dtype} KV" if dtype else "no data")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.text(0.01, 0.01, "Published: headline claims from the abstracts (no perplexity reported): "
             "CacheGen arXiv:2310.07240, KVTC arXiv:2511.01815.", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
