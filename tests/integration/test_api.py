"""OpenAI API behaviour beyond greedy equality: stop strings, seeds, usage, metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import manifest_for, serving


@pytest.fixture(scope="module")
def server(ray_session, llama_dir):
    with serving(manifest_for(llama_dir)) as (url, dep):
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)


def test_stop_string_cuts_text_in_both_modes(server):
    _, client = server
    full = client.completions.create(model="tiny", prompt="import os\n", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = client.completions.create(model="tiny", prompt="import os\n", max_tokens=24, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="import os\n", max_tokens=24, temperature=0, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == full[: full.index(stop)]


def test_seed_reproducible_over_http(server):
    _, client = server
    kw = dict(model="tiny", prompt="class Foo:", max_tokens=12, temperature=1.0, seed=11)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_streamed_text_equals_non_streamed(server):
    _, client = server
    kw = dict(model="tiny", messages=[{"role": "user", "content": "résumé ✓ naïve"}], max_tokens=20,
              temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert parts == whole


def test_metrics_count_what_was_served(server):
    url, client = server
    client.completions.create(model="tiny", prompt="x = 1", max_tokens=5, extra_body={"ignore_eos": True})
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in ("splitserve_ttft_seconds_count", "splitserve_tpot_seconds_count", "splitserve_e2e_seconds_count",
                 "splitserve_queue_seconds_count", "splitserve_kv_transfer_bytes_total",
                 "splitserve_worker_kv_blocks_total", "splitserve_worker_running_requests"):
        assert name in text, name
    kv_bytes = float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("splitserve_kv_transfer_bytes_total")))
    assert kv_bytes > 0
