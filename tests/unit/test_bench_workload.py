"""Arrivals (rate, seed, burstiness), synthetic workloads, trace parsing and replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.workload import (WORKLOADS, LengthRange, WorkloadError, arrival_times, load_trace,
                                 parse_length, replay, synthetic, trace_rate)


def test_arrivals_are_reproducible_per_seed():
    a = arrival_times(4.0, 30.0, seed=7)
    assert a == arrival_times(4.0, 30.0, seed=7)
    assert a != arrival_times(4.0, 30.0, seed=8)
    assert a == sorted(a) and all(0 <= t < 30.0 for t in a)


@pytest.mark.parametrize("rate", [0.5, 3.0, 20.0])
def test_poisson_mean_rate_and_exponential_gaps(rate):
    duration = 4000 / rate  # about 4000 arrivals
    t = arrival_times(rate, duration, seed=1)
    assert abs(len(t) / duration - rate) / rate < 0.05
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.08  # exponential: CV = 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_rate_and_sets_cv(burstiness):
    t = arrival_times(5.0, 1000.0, seed=3, burstiness=burstiness)
    assert abs(len(t) / 1000.0 - 5.0) / 5.0 < 0.08
    gaps = np.diff(t)
    cv = gaps.std() / gaps.mean()
    assert abs(cv - 1 / np.sqrt(burstiness)) / (1 / np.sqrt(burstiness)) < 0.12


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_rate(rate):
    with pytest.raises(WorkloadError, match="rate"):
        arrival_times(rate, 10.0, seed=0)


def test_synthetic_lengths_exact_and_seeded():
    w = WORKLOADS["summarize"]
    reqs = synthetic(w, 5.0, 10.0, seed=2, vocab_size=1024)
    assert reqs == synthetic(w, 5.0, 10.0, seed=2, vocab_size=1024)
    assert [r.arrival_s for r in reqs] == arrival_times(5.0, 10.0, seed=2)
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_tokens
        assert w.prompt.lo <= r.prompt_tokens <= w.prompt.hi
        assert w.output.lo <= r.output_tokens <= w.output.hi
        assert all(3 <= t < 1024 for t in r.prompt)
    # No two prompts share a first block (no accidental prefix-cache hits).
    assert len({tuple(r.prompt[:16]) for r in reqs}) == len(reqs)


def test_workloads_have_their_shapes():
    chat, summ, gen = WORKLOADS["chat"], WORKLOADS["summarize"], WORKLOADS["generate"]
    assert summ.prompt.lo > 4 * chat.prompt.hi and summ.output.hi <= chat.output.hi
    assert gen.output.lo > chat.output.hi and gen.prompt.hi <= chat.prompt.hi


def test_parse_length():
    assert parse_length("64", "--x") == LengthRange(64, 64)
    assert parse_length("8:32", "--x") == LengthRange(8, 32)
    for bad in ("0", "a", "32:8", "1:2:3", ""):
        with pytest.raises(WorkloadError, match="--prompt-tokens"):
            parse_length(bad, "--prompt-tokens")


def _trace(tmp_path, lines):
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_trace_loads_all_prompt_forms(tmp_path):
    p = _trace(tmp_path, [
        json.dumps({"arrival_s": 1.5, "prompt": "hello world", "output_tokens": 4}),
        "",
        json.dumps({"arrival_s": 0.0, "prompt_tokens": 12, "output_tokens": 3}),
        json.dumps({"arrival_s": 0.5, "prompt": [5, 6, 7], "output_tokens": 2, "extra": "ignored"}),
    ])
    reqs = load_trace(p)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.5]
    assert len(reqs[0].prompt) == 12 and reqs[0].prompt_tokens == 12
    assert reqs[1].prompt == [5, 6, 7] and reqs[1].prompt_tokens == 3
    assert reqs[2].prompt == "hello world" and reqs[2].output_tokens == 4


@pytest.mark.parametrize("line, reason", [
    ('{"arrival_s": 0, "prompt": "x", "output_tokens": 2', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x", "output_tokens": 2}', "'arrival_s' must be a number"),
    ('{"arrival_s": -1, "prompt": "x", "output_tokens": 2}', "'arrival_s' must be a number >= 0"),
    ('{"arrival_s": "1", "prompt": "x", "output_tokens": 2}', "'arrival_s'"),
    ('{"arrival_s": 1, "prompt": "x"}', "'output_tokens' must be an integer >= 1"),
    ('{"arrival_s": 1, "prompt": "x", "output_tokens": 0}', "'output_tokens'"),
    ('{"arrival_s": 1, "prompt": "x", "output_tokens": true}', "'output_tokens'"),
    ('{"arrival_s": 1, "output_tokens": 3}', "exactly one of 'prompt'"),
    ('{"arrival_s": 1, "prompt": "x", "prompt_tokens": 3, "output_tokens": 3}', "exactly one"),
    ('{"arrival_s": 1, "prompt": "", "output_tokens": 3}', "'prompt' must be a non-empty"),
    ('{"arrival_s": 1, "prompt": [1, "a"], "output_tokens": 3}', "'prompt' must be"),
    ('{"arrival_s": 1, "prompt_tokens": 2.5, "output_tokens": 3}', "'prompt_tokens'"),
])
def test_malformed_trace_line_names_file_and_line(tmp_path, line, reason):
    good = json.dumps({"arrival_s": 0, "prompt": "ok", "output_tokens": 1})
    p = _trace(tmp_path, [good, good, line, good])
    with pytest.raises(WorkloadError) as e:
        load_trace(p)
    assert f"{p}:3:" in str(e.value) and reason in str(e.value)


def test_trace_missing_or_empty(tmp_path):
    with pytest.raises(WorkloadError, match="does not exist"):
        load_trace(tmp_path / "nope.jsonl")
    with pytest.raises(WorkloadError, match="no requests"):
        load_trace(_trace(tmp_path, ["", "  "]))


def test_replay_rescales_to_rate_and_cuts_at_duration(tmp_path):
    lines = [json.dumps({"arrival_s": 10 + i, "prompt_tokens": 4, "output_tokens": 2}) for i in range(11)]
    trace = load_trace(_trace(tmp_path, lines))
    assert trace_rate(trace) == pytest.approx(1.1)  # 11 requests over 10 s
    same = replay(trace, None, 100.0)
    assert [r.arrival_s for r in same] == [float(i) for i in range(11)]
    fast = replay(trace, 2.2, 100.0)  # twice as fast
    assert [r.arrival_s for r in fast] == pytest.approx([i / 2 for i in range(11)])
    assert len(replay(trace, None, 4.5)) == 5
