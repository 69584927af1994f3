"""The load client: OpenAI protocol over an async HTTP client (httpx), streaming, so that
TTFT and every inter-token gap are measured where a user would see them.

`preflight` checks the server before any load (reachable, OpenAI-shaped /v1/models, one
streamed completion that ends with [DONE]); `send` runs one request and never raises for
a failed request: it returns a result with ok=False and the error.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from benchmarks.workload import RequestSpec

Endpoint = Literal["completions", "chat"]


class ServerCheckError(RuntimeError):
    """The target is unreachable or does not speak the OpenAI protocol."""


@dataclass
class ServerInfo:
    url: str
    model: str            # model id requests are sent with
    splitserve: bool      # the server is ours: send our extensions (return_token_ids)


@dataclass
class Result:
    ok: bool
    error: str | None
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    e2e_s: float
    gaps_s: list[float] = field(default_factory=list)  # between successive token-bearing chunks

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def make_client(timeout_s: float) -> httpx.AsyncClient:
    # No client-side connection cap: an open-loop client must never queue a request itself.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    # A server that wants an API key (SPLITSERVE_API_KEY) gets the one in this environment.
    key = os.environ.get("SPLITSERVE_API_KEY", "").strip()
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits, headers=headers)


def _error_text(body: bytes | str, status: int) -> str:
    try:
        obj = json.loads(body)
        msg = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj.get("detail")
        if msg:
            return f"HTTP {status}: {str(msg)[:200]}"
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    return f"HTTP {status}: {text[:200]}"


async def preflight(client: httpx.AsyncClient, url: str, model: str | None,
                    endpoint: Endpoint) -> ServerInfo:
    """Fails with a ServerCheckError saying what was expected and found."""
    url = url.rstrip("/")
    try:
        r = await client.get(f"{url}/v1/models", timeout=10)
    except httpx.HTTPError as e:
        raise ServerCheckError(f"cannot reach {url} ({type(e).__name__}: {e}); is the server "
                               "running and is the URL right (scheme, host, port)?") from None
    try:
        data = r.json()["data"]
        ids = [m["id"] for m in data]
        owners = {m.get("owned_by") for m in data}
    except (ValueError, KeyError, TypeError):
        raise ServerCheckError(f"{url}/v1/models answered HTTP {r.status_code} with "
                               f"{r.text[:120]!r}; expected an OpenAI model list "
                               "{\"data\": [{\"id\": ...}]}; is this an OpenAI-compatible "
                               "server?") from None
    if r.status_code != 200 or not ids:
        raise ServerCheckError(f"{url}/v1/models answered HTTP {r.status_code} with no model")
    if model is None:
        model = ids[0]
    elif model not in ids:
        raise ServerCheckError(f"model {model!r} is not served by {url}; served: {ids}")
    info = ServerInfo(url, model, "splitserve" in owners)
    probe = RequestSpec(0.0, "Hello", 0, 2)
    res = await send(client, info, probe, endpoint, timeout_s=60)
    if not res.ok:
        raise ServerCheckError(f"{url}: a 2-token streamed {endpoint} request failed: {res.error}")
    return info


def _body(info: ServerInfo, spec: RequestSpec, endpoint: Endpoint) -> dict[str, Any]:
    body: dict[str, Any] = {"model": info.model, "max_tokens": spec.output_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 0.0,
                            "ignore_eos": True}
    if info.splitserve:
        body["return_token_ids"] = True
    if endpoint == "chat":
        text = spec.prompt if isinstance(spec.prompt, str) else " ".join(f"w{t}" for t in spec.prompt)
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = spec.prompt
    return body


def _chunk_tokens(choice: dict[str, Any]) -> int:
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return 1 if text else 0


async def _stream(client: httpx.AsyncClient, info: ServerInfo, spec: RequestSpec,
                  endpoint: Endpoint, t0: float, res: Result) -> None:
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    last: float | None = None
    usage_out: int | None = None
    done = False
    async with client.stream("POST", info.url + path, json=_body(info, spec, endpoint)) as r:
        if r.status_code != 200:
            res.error = _error_text(await r.aread(), r.status_code)
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                err = obj["error"]
                res.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                return
            if obj.get("usage"):
                usage_out = obj["usage"].get("completion_tokens")
                res.prompt_tokens = obj["usage"].get("prompt_tokens") or res.prompt_tokens
            n = sum(_chunk_tokens(c) for c in obj.get("choices") or [])
            if n:
                now = time.perf_counter()
                if last is None:
                    res.ttft_s = now - t0
                else:
                    res.gaps_s.append(now - last)
                last = now
                res.output_tokens += n
    if not done:
        res.error = "stream ended without data: [DONE]"
        return
    if usage_out is not None:
        res.output_tokens = usage_out
    if res.ttft_s is None:
        res.error = "no token received"
        return
    res.ok = True


async def send(client: httpx.AsyncClient, info: ServerInfo, spec: RequestSpec,
               endpoint: Endpoint, timeout_s: float) -> Result:
    """One streamed request; the whole request (not just each read) is bounded by timeout_s."""
    res = Result(False, None, spec.prompt_tokens, 0, None, 0.0)
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(client, info, spec, endpoint, t0, res)
    except TimeoutError:
        res.error = f"timeout after {timeout_s:g}s"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {str(e)[:200]}"
    except (ValueError, KeyError, TypeError) as e:
        res.error = f"malformed stream: {type(e).__name__}: {str(e)[:200]}"
    res.e2e_s = time.perf_counter() - t0
    if res.error is not None:
        res.ok = False
    return res
