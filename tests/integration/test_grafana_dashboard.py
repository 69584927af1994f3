"""deploy/grafana/splitserve.json reads only metrics a running server exports: every
metric name in its PromQL (panels and template queries) is a series of /metrics after a
request; and the vLLM-named series (what dashboards written for vLLM read) count what
was served."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import manifest_for, serving

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "splitserve.json"
# PromQL words that look like names but are not metrics.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: names not followed by '(' (functions and
    aggregations), outside label matchers, ranges, strings and by/without label lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[a-zA-Z_:][\w:]*", expr):  # not the unit of 5m, not 1e3
        if expr[m.end():].lstrip().startswith("(") or m.group().lower() in KEYWORDS:
            continue
        names.add(m.group())
    return names


def dashboard_metric_names(dash: dict) -> set[str]:
    names: set[str] = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names |= promql_metric_names(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*[a-zA-Z_]\w*\s*\)", query)
            names |= promql_metric_names(m.group(1) if m else query)
    return names


def test_the_promql_reader_finds_metric_names_only():
    expr = ('histogram_quantile(0.99, sum by (le, pool) (rate(vllm:time_to_first_token_seconds_bucket'
            '{model_name=~"$model_name"}[$__rate_interval]))) / on (pool) group_left max(foo_total offset 5m)')
    assert promql_metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "foo_total"}
    dash = {"panels": [{"targets": [{"expr": "sum(a_total) + b"}]}],
            "templating": {"list": [{"type": "query", "query": {"query": "label_values(c_gauge, model_name)"}}]}}
    assert dashboard_metric_names(dash) == {"a_total", "b", "c_gauge"}


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"].strip() and t["refId"] for t in p["targets"]), p["title"]
    names = dashboard_metric_names(dash)
    for vllm_name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                      "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_running",
                      "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert vllm_name in names


def test_every_dashboard_metric_is_exported_by_a_running_server(ray_session, llama_dir):
    dash = json.loads(DASHBOARD.read_text())
    with serving(manifest_for(llama_dir)) as (url, _dep):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.labels.get("le") is None}
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    missing = sorted(dashboard_metric_names(dash) - exported)
    assert not missing, f"the dashboard reads metrics /metrics does not export: {missing}"

    def value(name: str) -> float:
        s = samples[name]
        assert s.labels.get("model_name") == "tiny", s
        return s.value

    # The vLLM-named series count what was served: one request, 5 tokens, 4 gaps between them.
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert value("vllm:time_to_first_token_seconds_count") == 1
    assert value("vllm:e2e_request_latency_seconds_count") == 1
    assert value("vllm:inter_token_latency_seconds_count") == 4
    assert value("vllm:e2e_request_latency_seconds_sum") >= value("vllm:time_to_first_token_seconds_sum") > 0
    assert value("vllm:generation_tokens_total") == 5
    assert value("vllm:prompt_tokens_total") == prompt_tokens
    assert 0 <= value("vllm:kv_cache_usage_perc") <= 1
    assert value("vllm:num_requests_running") >= 0 and value("vllm:num_requests_waiting") >= 0
