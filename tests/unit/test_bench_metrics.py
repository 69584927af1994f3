"""Metrics and both goodput definitions on hand-computed cases; summary recomputation from
requests.jsonl; the /metrics phase breakdown."""

from __future__ import annotations

import json

import pytest

from benchmarks.metrics import (FIELDS, SLO, RequestRecord, compute_summary, distserve_goodput,
                                read_records, summarize_run, write_records)
from benchmarks.phases import breakdown, parse_metrics


def rec(arrival, ttft, tpot, e2e, ok=True, out=10, rate=1.0, nodes=1, error=None):
    return RequestRecord(rate=rate, nodes=nodes, arrival_s=arrival, prompt_tokens=32, output_tokens=out,
                         ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, ok=ok,
                         error=None if ok else (error or "HTTP 500: boom"))


SLO_ = SLO(ttft_ms=200, tpot_ms=50, attainment=0.9)


def test_run_metrics_by_hand():
    records = [
        rec(0.0, 0.100, 0.040, 0.460),             # meets both
        rec(1.0, 0.300, 0.040, 0.660),             # misses TTFT
        rec(2.0, 0.150, 0.060, 0.690),             # misses TPOT
        rec(3.0, 0.050, 0.050, 0.500),             # meets both (at the limit)
        rec(4.0, None, None, 2.0, ok=False, out=0),  # failed: counts against every attainment
    ]
    s = summarize_run(records, SLO_)
    assert (s["requests"], s["succeeded"], s["failed"]) == (5, 4, 1)
    assert s["errors"] == {"HTTP 500: boom": 1}
    assert s["elapsed_s"] == pytest.approx(6.0)  # last end: 4.0 + 2.0
    assert s["attainment"] == {"ttft": pytest.approx(3 / 5), "tpot": pytest.approx(3 / 5),
                               "both": pytest.approx(2 / 5)}
    assert s["throughput_rps"] == pytest.approx(4 / 6)
    assert s["goodput_rps"] == pytest.approx(2 / 6)  # vLLM --goodput
    assert s["output_tokens_per_s"] == pytest.approx(40 / 6)
    # Percentiles over the succeeded requests only: TTFTs 0.05, 0.1, 0.15, 0.3.
    assert s["ttft_s"]["p50"] == pytest.approx(0.125)
    assert s["ttft_s"]["mean"] == pytest.approx(0.15)
    assert s["ttft_s"]["p90"] == pytest.approx(0.15 + 0.7 * 0.15)  # numpy linear interpolation
    assert s["tpot_s"]["p50"] == pytest.approx(0.045)


def test_empty_and_all_failed_runs():
    s = summarize_run([rec(0.0, None, None, 1.0, ok=False, out=0)], SLO_)
    assert s["attainment"]["both"] == 0 and s["goodput_rps"] == 0 and s["ttft_s"]["p50"] is None
    s = summarize_run([rec(0.0, None, None, None, ok=False, out=0)], SLO_)  # no end time at all
    assert s["elapsed_s"] == 0 and s["throughput_rps"] == 0


def _run(rate, both):
    return {"rate": rate, "attainment": {"both": both}}


@pytest.mark.parametrize("attain, expected", [
    ([1.0, 0.95, 0.8, 0.95], 2.0),   # stays above the target up to 2; 4 does not count
    ([0.95, 0.9, 0.9, 0.91], 4.0),   # the target itself is attained
    ([0.5, 1.0, 1.0, 1.0], 0.0),     # fails at the lowest rate
])
def test_distserve_goodput(attain, expected):
    runs = [_run(r, a) for r, a in zip([4.0, 1.0, 2.0, 3.0], [attain[3], attain[0], attain[1], attain[2]])]
    assert distserve_goodput(runs, 0.9) == expected


def _config(gpus):
    return {"layout": "x", "slo_ttft_ms": 200, "slo_tpot_ms": 50, "attainment_target": 0.75,
            "gpus": gpus, "gpu_unit": "cpu"}


def test_summary_groups_by_nodes_and_rate_and_divides_by_gpus():
    records = []
    # nodes=1: rate 1 all good, rate 2 half good -> DistServe 1 req/s over 2 CPUs.
    records += [rec(i, 0.1, 0.01, 0.2, rate=1.0, nodes=1) for i in range(4)]
    records += [rec(i, 0.1 if i % 2 else 0.9, 0.01, 0.5, rate=2.0, nodes=1) for i in range(4)]
    # nodes=2: both rates good -> 2 req/s over 4 CPUs.
    records += [rec(i, 0.1, 0.01, 0.2, rate=r, nodes=2) for r in (1.0, 2.0) for i in range(4)]
    s = compute_summary(records, _config({"1": 2.0, "2": 4.0}))
    assert [(r["nodes"], r["rate"]) for r in s["runs"]] == [(1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0)]
    g1, g2 = s["goodput"]
    assert (g1["nodes"], g1["distserve_rate_rps"], g1["distserve_per_gpu_rps"]) == (1, 1.0, 0.5)
    assert (g2["nodes"], g2["distserve_rate_rps"], g2["distserve_per_gpu_rps"]) == (2, 2.0, 0.5)
    # vLLM goodput, best rate: nodes=1 rate 1 -> 4 good over elapsed 3.2 s.
    assert g1["vllm_goodput_max_rps"] == pytest.approx(4 / 3.2)
    assert s["config"]["gpus"] == {"1": 2.0, "2": 4.0}


def test_summary_recomputes_from_jsonl(tmp_path):
    records = [rec(i * 0.37, 0.1 + i / 97, 0.02 + i / 991, 0.5 + i / 13, rate=r, nodes=n,
                   ok=i % 7 != 3, out=0 if i % 7 == 3 else 12)
               for n in (1, 3) for r in (0.5, 1.5) for i in range(20)]
    cfg = _config({"1": 2.0, "3": 6.0})
    direct = compute_summary(records, cfg)
    path = tmp_path / "requests.jsonl"
    write_records(path, records)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(list(d) == list(FIELDS) for d in lines)
    again = compute_summary(read_records(path), json.loads(json.dumps(cfg)))
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(direct))


BEFORE = """
# TYPE splitserve_queue_seconds histogram
splitserve_queue_seconds_bucket{le="0.1"} 2
splitserve_queue_seconds_bucket{le="1.0"} 2
splitserve_queue_seconds_bucket{le="+Inf"} 2
splitserve_queue_seconds_count 2
splitserve_queue_seconds_sum 0.1
# TYPE splitserve_kv_transfer_bytes counter
splitserve_kv_transfer_bytes_total 1000
# TYPE splitserve_kv_transfer_seconds counter
splitserve_kv_transfer_seconds_total 0.5
"""

AFTER = """
# TYPE splitserve_queue_seconds histogram
splitserve_queue_seconds_bucket{le="0.1"} 4
splitserve_queue_seconds_bucket{le="1.0"} 6
splitserve_queue_seconds_bucket{le="+Inf"} 6
splitserve_queue_seconds_count 6
splitserve_queue_seconds_sum 1.3
# TYPE splitserve_ttft_seconds histogram
splitserve_ttft_seconds_bucket{le="+Inf"} 4
splitserve_ttft_seconds_count 4
splitserve_ttft_seconds_sum 0.8
# TYPE splitserve_e2e_seconds histogram
splitserve_e2e_seconds_bucket{le="+Inf"} 4
splitserve_e2e_seconds_count 4
splitserve_e2e_seconds_sum 4.8
# TYPE splitserve_kv_transfer_bytes counter
splitserve_kv_transfer_bytes_total 251000
# TYPE splitserve_kv_transfer_seconds counter
splitserve_kv_transfer_seconds_total 1.5
"""


def test_phase_breakdown_is_the_difference_of_two_scrapes():
    p = breakdown(parse_metrics(BEFORE), parse_metrics(AFTER))
    assert p["queue_s"]["count"] == 4 and p["queue_s"]["mean"] == pytest.approx(0.3)
    # 2 of the run's 4 fall in (0, 0.1], 2 in (0.1, 1]: the median is the 0.1 boundary,
    # p90 is 0.1 + 0.9 * (3.6 - 2) / 2.
    assert p["queue_s"]["p50"] == pytest.approx(0.1)
    assert p["queue_s"]["p90"] == pytest.approx(0.1 + 0.9 * 0.8)
    assert p["decode_s_mean"] == pytest.approx(1.2 - 0.2)
    kv = p["kv_transfer"]
    assert kv["bytes"] == 250000 and kv["seconds"] == pytest.approx(1.0)
    assert kv["gbps"] == pytest.approx(0.002) and kv["compression_ratio"] is None
    assert p["prefill_s"] is None
    assert breakdown(None, parse_metrics(AFTER)) is None
