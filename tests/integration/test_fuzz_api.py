"""Bad input at scale: schemathesis generates request bodies from the served OpenAPI schema
(valid ones and ones that break it) for both POST endpoints; every answer is a 2xx or a 4xx
with an OpenAI error object, never a 5xx or a traceback. Valid bodies name the served model
and get their max_tokens and n capped (the tiny model would otherwise generate thousands
of tokens per example)."""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (the test extra)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from .conftest import manifest_for, serving  # noqa: E402

EXAMPLES = 45  # per endpoint and mode: 2 endpoints x 2 modes x 45 = 180 bodies


@pytest.fixture(scope="module")
def url(ray_session, llama_dir):
    with serving(manifest_for(llama_dir)) as (u, _dep):
        yield u


def cap(case):
    b = case.body
    if isinstance(b, dict):
        b["model"] = "tiny"  # else nearly every body is a 404 (unknown model)
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(b.get(k), int) and not isinstance(b.get(k), bool) and b[k] > 4:
                b[k] = 4
        for k in ("n", "best_of"):
            if isinstance(b.get(k), int) and not isinstance(b.get(k), bool) and b[k] > 2:
                b[k] = 2
    return case


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_bodies_get_no_5xx(url, path, mode):
    import httpx

    raw = httpx.get(f"{url}/openapi.json", timeout=10).json()
    assert "requestBody" in raw["paths"][path]["post"]
    schema = schemathesis.openapi.from_dict(raw)
    op = schema[path]["POST"]
    gen_mode = schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    seen: list[tuple[int, object]] = []
    bad: list[tuple[object, int, str]] = []

    strategy = op.as_strategy(generation_mode=gen_mode)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy.map(cap) if mode == "positive" else strategy)
    def run(case):
        r = case.call(base_url=url, timeout=120)
        seen.append((r.status_code, case.body))
        text = r.text
        if r.status_code >= 500 or "Traceback" in text:
            bad.append((case.body, r.status_code, text[:300]))
            return
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
            except Exception:  # noqa: BLE001 - recorded
                bad.append((case.body, r.status_code, text[:300]))

    run()
    assert not bad, json.dumps(bad[:3], default=str)[:2000]
    assert len(seen) >= 40, len(seen)
    codes = sorted({c for c, _ in seen})
    print(f"{path} {mode}: {len(seen)} bodies, statuses {codes}")
    if mode == "negative":
        assert any(400 <= c < 500 for c, _ in seen)
    else:  # valid bodies are served, not only refused
        assert any(c == 200 for c, _ in seen), codes
