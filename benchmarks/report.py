"""What people look at: a console table per layout, PNG plots (matplotlib, Agg), and the
goodput ratio of a `--compare` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def print_summary(summary: dict[str, Any], console: Console) -> None:
    cfg = summary["config"]
    t = Table(title=f"{cfg['layout']}: SLO TTFT {cfg['slo_ttft_ms']:g} ms, TPOT {cfg['slo_tpot_ms']:g} ms"
                    + (" (interrupted)" if summary.get("interrupted") else ""))
    for col in ("nodes", "rate/s", "sent", "failed", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
                "attain TTFT", "attain TPOT", "attain both", "thru rps", "goodput rps"):
        t.add_column(col, justify="right")
    for r in summary["runs"]:
        tt, tp, a = r["ttft_s"], r["tpot_s"], r["attainment"]
        t.add_row(str(r["nodes"]), f"{r['rate']:g}", str(r["requests"]), str(r["failed"]),
                  "/".join(_ms(tt[k]) for k in ("p50", "p90", "p99")),
                  "/".join(_ms(tp[k]) for k in ("p50", "p90", "p99")),
                  f"{a['ttft']:.2f}", f"{a['tpot']:.2f}", f"{a['both']:.2f}",
                  f"{r['throughput_rps']:.2f}", f"{r['goodput_rps']:.2f}")
    console.print(t)
    unit = cfg.get("gpu_unit", "gpu")
    for g in summary["goodput"]:
        per = g["distserve_per_gpu_rps"]
        console.print(f"  nodes={g['nodes']}: DistServe goodput {g['distserve_rate_rps']:g} req/s at "
                      f">= {cfg['attainment_target']:.0%} attainment = "
                      f"{'-' if per is None else f'{per:.3f}'} req/s per {unit} ({g['gpus']:g} {unit}s); "
                      f"best vLLM goodput {g['vllm_goodput_max_rps']:.2f} req/s")


def plot(summaries: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """attainment_vs_rate.png and goodput_vs_nodes.png, one line per layout (and node count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    target = None
    for s in summaries:
        target = s["config"]["attainment_target"]
        multi_nodes = len({r["nodes"] for r in s["runs"]}) > 1
        for nodes in sorted({r["nodes"] for r in s["runs"]}):
            runs = sorted((r for r in s["runs"] if r["nodes"] == nodes), key=lambda r: r["rate"])
            label = s["config"]["layout"] + (f", {nodes} nodes" if multi_nodes else "")
            ax.plot([r["rate"] for r in runs], [r["attainment"]["both"] for r in runs], marker="o",
                    label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("SLO attainment (TTFT and TPOT)")
    ax.set_ylim(-0.02, 1.02)
    if summaries:
        c = summaries[0]["config"]
        ax.set_title(f"SLO attainment vs rate (TTFT <= {c['slo_ttft_ms']:g} ms, "
                     f"TPOT <= {c['slo_tpot_ms']:g} ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "attainment_vs_rate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, s in enumerate(summaries):
        g = sorted(s["goodput"], key=lambda x: x["nodes"])
        unit = s["config"].get("gpu_unit", "gpu")
        name, color = s["config"]["layout"], f"C{i}"
        nodes = [x["nodes"] for x in g]
        ax1.plot(nodes, [x["distserve_rate_rps"] for x in g], marker="o", color=color,
                 label=f"{name} (DistServe: max rate at target)")
        ax1.plot(nodes, [x["vllm_goodput_max_rps"] for x in g], marker="x", linestyle=":", color=color,
                 label=f"{name} (vLLM: best goodput_rps)")
        ax2.plot(nodes, [x["distserve_per_gpu_rps"] or 0 for x in g], marker="o", color=color,
                 label=f"{name} (per {unit})")
    ax1.set_xlabel("nodes")
    ax1.set_ylabel("goodput (requests/s)")
    ax1.set_title("goodput vs node count")
    ax2.set_xlabel("nodes")
    ax2.set_ylabel("DistServe goodput per accelerator (req/s)")
    ax2.set_title("per GPU (per CPU share on CPU)")
    all_nodes = sorted({g["nodes"] for s in summaries for g in s["goodput"]})
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_xticks(all_nodes)
        if len(all_nodes) == 1:
            ax.set_xlim(all_nodes[0] - 1, all_nodes[0] + 1)
    fig.tight_layout()
    paths.append(out_dir / "goodput_vs_nodes.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Goodput of layout A over layout B: DistServe per accelerator per node count, and
    vLLM goodput at every (nodes, rate) both ran."""
    out: dict[str, Any] = {"a": a["config"]["layout"], "b": b["config"]["layout"], "nodes": [], "runs": []}
    gb = {g["nodes"]: g for g in b["goodput"]}
    for g in a["goodput"]:
        h = gb.get(g["nodes"])
        if h is None:
            continue
        ratio = _ratio(g["distserve_per_gpu_rps"], h["distserve_per_gpu_rps"])
        # B met the target at no swept rate: its goodput is below the lowest one, so the
        # ratio is at least A's over what B would have at the lowest rate.
        lowest = min(r["rate"] for r in b["runs"] if r["nodes"] == g["nodes"])
        bound = None
        if ratio is None and g["distserve_per_gpu_rps"] and h["gpus"]:
            bound = g["distserve_per_gpu_rps"] / (lowest / h["gpus"])
        out["nodes"].append({
            "nodes": g["nodes"],
            "distserve_per_gpu_a": g["distserve_per_gpu_rps"], "distserve_per_gpu_b": h["distserve_per_gpu_rps"],
            "distserve_per_gpu_ratio": ratio,
            "distserve_per_gpu_ratio_at_least": bound,
            "vllm_goodput_max_ratio": _ratio(g["vllm_goodput_max_rps"], h["vllm_goodput_max_rps"]),
        })
    rb = {(r["nodes"], r["rate"]): r for r in b["runs"]}
    for r in a["runs"]:
        s = rb.get((r["nodes"], r["rate"]))
        if s is not None:
            out["runs"].append({"nodes": r["nodes"], "rate": r["rate"],
                                "goodput_a": r["goodput_rps"], "goodput_b": s["goodput_rps"],
                                "attainment_a": r["attainment"]["both"], "attainment_b": s["attainment"]["both"],
                                "goodput_ratio": _ratio(r["goodput_rps"], s["goodput_rps"])})
    return out


def print_compare(c: dict[str, Any], console: Console) -> None:
    def f(x: float | None) -> str:
        return "n/a (B is 0)" if x is None else f"{x:.2f}x"

    for n in c["nodes"]:
        ds = f(n["distserve_per_gpu_ratio"])
        if n.get("distserve_per_gpu_ratio_at_least") is not None:
            ds = (f"> {n['distserve_per_gpu_ratio_at_least']:.2f}x ({c['b']} misses the target "
                  "already at the lowest rate)")
        console.print(f"[bold]goodput ratio {c['a']} / {c['b']}[/bold] at {n['nodes']} node(s): "
                      f"DistServe per accelerator {ds} "
                      f"({n['distserve_per_gpu_a']} vs {n['distserve_per_gpu_b']} req/s); "
                      f"best vLLM goodput {f(n['vllm_goodput_max_ratio'])}")
    for r in c["runs"]:
        console.print(f"  nodes={r['nodes']} rate={r['rate']:g}: goodput {r['goodput_a']:.2f} vs "
                      f"{r['goodput_b']:.2f} req/s ({f(r['goodput_ratio'])}), attainment "
                      f"{r['attainment_a']:.2f} vs {r['attainment_b']:.2f}")
