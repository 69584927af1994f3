"""Each bad request gets a 4xx OpenAI error naming the field; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from .conftest import manifest_for, serving


@pytest.fixture(scope="module")
def url(ray_session, llama_dir):
    m = manifest_for(llama_dir, mode="disaggregated",
                     model={"path": str(llama_dir), "name": "tiny", "max_model_len": 128})
    with serving(m) as (u, _dep):
        yield u


def post(url: str, path: str, body: object) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"},
                          timeout=30)
    return httpx.post(f"{url}{path}", json=body, timeout=30)


CASES = [
    # (path, body, status, words the message must contain)
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, ["gpt-9", "tiny"]),
    ("/v1/completions", {"model": "tiny"}, 400, ["prompt"]),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, ["prompt", "empty"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, ["messages"]),
    ("/v1/chat/completions", {"model": "tiny"}, 400, ["messages"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, ["max_tokens"]),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", 1]}, 400, ["prompt"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, ["max_tokens"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 500}, 400, ["max_tokens", "128"]),
    ("/v1/completions", {"model": "tiny", "prompt": list(range(3, 203))}, 400, ["prompt", "200", "128"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, ["temperature"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, ["top_p"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 1.01}, 400, ["top_p"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 17}, 400, ["n", "16"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 3, "best_of": 2}, 400, ["best_of", "n=3"]),
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, ["JSON"]),
    ("/v1/completions", {"model": "tiny", "prompt": [999999]}, 400, ["prompt"]),
    # Strict types, as OpenAI's API: nothing is coerced.
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, ["stream", "boolean", "'yes'"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": 1},
     400, ["stream", "boolean"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "5"}, 400, ["max_tokens", "integer"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 5.5}, 400, ["max_tokens", "integer"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "0"}, 400, ["temperature"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "ignore_eos": "true"}, 400, ["ignore_eos"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream_options": {"include_usage": "yes"}}, 400,
     ["stream_options.include_usage"]),
    # A body over server.max_request_bytes (default 512 KiB): 413 before it is parsed, so
    # an unknown 1 MB field is not read, and not even bad JSON gets as far as the parser.
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "junk": "x" * 1_000_000}, 413,
     ["524288", "max_request_bytes"]),
    ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"x" * 600_000, 413, ["524288"]),
]


@pytest.mark.parametrize("path,body,status,words", CASES)
def test_bad_request_is_rejected_clearly(url, path, body, status, words):
    r = post(url, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"] or w == err["param"], (w, err)


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(url):
    """No Content-Length: the server reads up to the limit, then answers 413."""
    def body():
        yield b'{"model": "tiny", "prompt": "hi", "user": "'
        for _ in range(100):
            yield b"x" * 10_000
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=body(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    # Just under the limit is parsed as usual (here: a valid request; unknown fields are
    # refused, so the bulk rides in the OpenAI "user" field, which has no effect).
    small = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "hi", "max_tokens": 2, "user": "x" * 500_000})
    assert small.status_code == 200, small.text


def test_the_completion_paths_answer_as_routes_do(url):
    """The two POST endpoints are served outside FastAPI's routing (cluster/http_app.py):
    other methods still get 405 naming the allowed one, a trailing slash the usual
    redirect, the schema documents both, and each answer has its content type and length."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.get(f"{url}{path}", timeout=30)
        assert r.status_code == 405 and r.headers["allow"] == "POST", (path, r.status_code, r.text)
        r = httpx.put(f"{url}{path}", json={}, timeout=30)
        assert r.status_code == 405, (path, r.status_code)
        r = httpx.post(f"{url}{path}/", json={}, timeout=30)
        assert r.status_code == 307 and r.headers["location"].endswith(path), (path, r.status_code)
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        op = schema["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(op["responses"])
    ok = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert int(ok.headers["content-length"]) == len(ok.content)
    assert "worker;dur=" in ok.headers["server-timing"] and "ingress;dur=" in ok.headers["server-timing"]
    bad = post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "yes"})
    assert bad.headers["content-type"] == "application/json" and int(bad.headers["content-length"]) == len(bad.content)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream; charset=utf-8"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_server_still_serves_after_bad_input(url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)
    r = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4)
    assert c.choices[0].message.role == "assistant"
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_overload_gives_429_with_retry_after(ray_session, llama_dir):
    import asyncio

    m = manifest_for(llama_dir, server={"max_waiting_requests": 1, "request_timeout_s": 60,
                                        "token_timeout_s": 20})
    with serving(m) as (u, _dep):
        async def go():
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"model": "tiny", "prompt": "x", "max_tokens": 64, "ignore_eos": True}
                return await asyncio.gather(*(c.post(f"{u}/v1/completions", json=body) for _ in range(6)))
        codes = [r.status_code for r in asyncio.run(go())]
        assert 200 in codes and 429 in codes, codes
        r429 = next(r for r in asyncio.run(go()) if r.status_code == 429)
        assert r429.headers["retry-after"] and r429.json()["error"]["type"] == "rate_limit_error"
