"""`splitserve bench` against a live local server (the demo manifest, served in-process on
a free port): requests.jsonl and summary.json agree, and the per-phase breakdown comes
from the server's /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench import main
from benchmarks.metrics import SLO, compute_summary, read_records

from .conftest import serving

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "manifests" / "demo.yaml"


@pytest.fixture(scope="module")
def demo_url(ray_session):
    from cluster.manifest import load_manifest

    with serving(load_manifest(DEMO)) as (url, _dep):
        yield url


def test_bench_live_server_files_agree(demo_url, tmp_path):
    out = tmp_path / "bench"
    argv = ["--url", demo_url, "--rates", "1,2", "--duration", "4", "--workload", "chat",
            "--prompt-tokens", "16:64", "--output-tokens", "8:16", "--slo-ttft-ms", "1000",
            "--slo-tpot-ms", "150", "--gpus", "2", "--out", str(out), "--no-progress", "--seed", "3"]
    assert main(argv) == 0

    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert set(lines[0]) == {"rate", "nodes", "arrival_s", "prompt_tokens", "output_tokens", "ttft_s",
                             "tpot_s", "e2e_s", "ok", "error"}
    assert {x["rate"] for x in lines} == {1.0, 2.0} and {x["nodes"] for x in lines} == {1}
    ok = [x for x in lines if x["ok"]]
    assert len(ok) >= 0.9 * len(lines), [x["error"] for x in lines if not x["ok"]]
    for x in ok:
        assert 8 <= x["output_tokens"] <= 16 and 16 <= x["prompt_tokens"] <= 64
        assert 0 < x["ttft_s"] <= x["e2e_s"] and x["tpot_s"] > 0

    summary = json.loads((out / "summary.json").read_text())
    # The whole client-side summary recomputes from the lines...
    recomputed = compute_summary(read_records(out / "requests.jsonl"), summary["config"])
    assert {k: summary[k] for k in recomputed} == json.loads(json.dumps(recomputed))
    # ... and so does goodput, counted here by hand.
    slo = SLO(1000, 150, summary["config"]["attainment_target"])
    for run in summary["runs"]:
        mine = [x for x in lines if x["rate"] == run["rate"]]
        good = sum(x["ok"] and x["ttft_s"] <= slo.ttft_ms / 1e3 and x["tpot_s"] <= slo.tpot_ms / 1e3
                   for x in mine)
        elapsed = max(x["arrival_s"] + x["e2e_s"] for x in mine)
        assert run["goodput_rps"] == pytest.approx(good / elapsed)
        assert run["requests"] == len(mine)
    assert summary["goodput"][0]["gpus"] == 2.0

    # Server-side phases: every request of a run went through the prefill queue and the
    # KV transfer (disaggregated demo).
    for ph in summary["server_phases"]:
        p = ph["phases"]
        n = sum(1 for x in lines if x["rate"] == ph["rate"])
        assert p["queue_s"]["count"] == n and p["prefill_s"]["count"] == n
        assert p["kv_transfer"]["bytes"] > 0 and p["decode_s_mean"] > 0
    assert (out / "attainment_vs_rate.png").exists() and (out / "goodput_vs_nodes.png").exists()


def test_bench_rejects_a_server_without_the_model(demo_url, tmp_path, capsys):
    argv = ["--url", demo_url, "--rates", "1", "--duration", "1", "--model", "nope", "--slo-ttft-ms",
            "100", "--slo-tpot-ms", "10", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 1
    assert "model 'nope' is not served" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_bench_nodes_sweep_on_fake_nodes(tmp_path):
    """`--manifest --nodes 1,2` in its own process (it starts its own fake Ray cluster)."""
    out = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "benchmarks.bench", "--manifest", str(DEMO), "--nodes", "1,2",
           "--rates", "1", "--duration", "3", "--prompt-tokens", "16:32", "--output-tokens", "8",
           "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [g["nodes"] for g in summary["goodput"]] == [1, 2]
    assert [g["gpus"] for g in summary["goodput"]] == [2.0, 4.0]
