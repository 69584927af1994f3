"""Soak (issue 16, slow): 30 minutes (SPLITSERVE_SOAK_S to change) at 70% of the measured
capacity: every request succeeds, no process is lost, and no process's RSS grows by 5% or
more over the run after its warm-up (fitted line; benchmarks/soak.py). Its own Ray, in a
subprocess: run alone (``-m slow``), not beside the session fixture's cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_at_70_percent_loses_nothing_and_does_not_grow(tmp_path: Path) -> None:
    duration = float(os.environ.get("SPLITSERVE_SOAK_S", "1800"))
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--duration", str(duration), "--load", "0.7",
                           "--json", "--out", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=duration + 900)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "rss"}),
          {k: round(v["growth_pct"], 2) for k, v in report["rss"].items()})
    assert report["requests"] > 0.5 * report["rate_rps"] * duration, report
    assert report["errors"] == 0, report
    assert not report["processes_lost"], report
    assert set(report["rss"]) >= {"ingress", "controller"} and len(report["rss"]) >= 4, report["rss"]
    for name, fit in report["rss"].items():
        assert fit["growth_pct"] < 5.0, (name, fit)
    assert proc.returncode == 0, proc.stderr[-3000:]
