"""`bench --simulate`: the same sweep through the placement simulator, no Ray, rows
labelled simulated, and the same summary machinery (recomputable from requests.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench import main
from benchmarks.metrics import compute_summary, read_records

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "manifests" / "demo.yaml"
COLOCATED = ROOT / "deploy" / "manifests" / "demo-colocated.yaml"


def test_simulated_sweep_over_nodes(tmp_path, capsys):
    out = tmp_path / "sim"
    argv = ["--manifest", str(DEMO), "--simulate", "--gpu-type", "h100", "--nodes", "1,4", "--rates", "5,50",
            "--duration", "10", "--workload", "summarize", "--slo-ttft-ms", "200", "--slo-tpot-ms", "20",
            "--out", str(out), "--no-progress", "--no-plots"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = read_records(out / "requests.jsonl")
    assert summary["config"]["simulated"] is True and "simulated h100" in summary["config"]["layout"]
    assert {(r.nodes, r.rate) for r in records} == {(1, 5.0), (1, 50.0), (4, 5.0), (4, 50.0)}
    assert all(r.ok and r.ttft_s > 0 and r.tpot_s >= 0 for r in records)
    assert [g["gpus"] for g in summary["goodput"]] == [2.0, 8.0]  # 1 prefill + 1 decode per node
    recomputed = compute_summary(records, summary["config"])
    assert {k: summary[k] for k in recomputed} == json.loads(json.dumps(recomputed))
    # Four copies drain a 50 req/s load at least as well as one.
    by = {(r["nodes"], r["rate"]): r for r in summary["runs"]}
    assert by[(4, 50.0)]["ttft_s"]["p90"] <= by[(1, 50.0)]["ttft_s"]["p90"]


def test_simulated_compare_and_bad_gpu(tmp_path, capsys):
    argv = ["--compare", str(DEMO), str(COLOCATED), "--simulate", "--gpu-type", "a100-80g", "--rates", "2",
            "--duration", "5", "--out", str(tmp_path / "c"), "--no-progress", "--no-plots"]
    assert main(argv) == 0
    compare = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert compare["a"].startswith("demo (simulated") and compare["b"].startswith("demo-colocated (simulated")
    bad = argv[:]
    bad[bad.index("a100-80g")] = "tpu9"
    assert main(bad) == 2
    assert "--gpu-type: unknown GPU type 'tpu9'" in capsys.readouterr().err
    assert main(["--manifest", str(DEMO), "--simulate", "--rates", "1", "--duration", "1", "--out",
                 str(tmp_path / "x")]) == 2


def test_simulated_sweep_of_demo_afd(tmp_path, capsys):
    """demo-afd through the simulator: the attention and expert pools are one
    attention/expert decode instance (ping-pong), every request served."""
    out = tmp_path / "afd"
    argv = ["--manifest", str(ROOT / "deploy" / "manifests" / "demo-afd.yaml"), "--simulate", "--gpu-type", "h100",
            "--rates", "5", "--duration", "5", "--workload", "summarize", "--slo-ttft-ms", "200",
            "--slo-tpot-ms", "20", "--out", str(out), "--no-progress", "--no-plots"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = read_records(out / "requests.jsonl")
    assert records and all(r.ok and r.tpot_s >= 0 for r in records)
    assert [g["gpus"] for g in summary["goodput"]] == [4.0]  # 1 prefill + 1 attention + 2 expert
