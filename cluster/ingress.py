"""OpenAI-compatible HTTP ingress (FastAPI): validates, tokenizes, hands requests to the
Generator and speaks SSE. The only module that knows HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.errors import (InvalidRequestError, ModelNotFoundError, OverloadedError,
                            SplitServeError)
from cluster.generation import Delta, GenRequest, Generator, Usage
from cluster.manifest import Manifest
from cluster.metrics import Metrics
from cluster.protocol import ChatCompletionRequest, CommonParams, CompletionRequest, parse_request
from cluster.router import Router
from engine.sequence import SamplingParams

logger = logging.getLogger(__name__)

STATE_REFRESH_S = 0.5


def error_response(e: SplitServeError) -> JSONResponse:
    headers = {}
    if isinstance(e, OverloadedError):
        headers["Retry-After"] = str(e.retry_after_s)
    return JSONResponse(e.to_openai(), status_code=e.status_code, headers=headers)


def _sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class Ingress:
    def __init__(self, manifest: Manifest, controller: Any, tokenizer: Any, max_model_len: int) -> None:
        self.m = manifest
        self.controller = controller
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.metrics = Metrics()
        self.router = Router(manifest.kv_cache.block_size)
        self.gen = Generator(manifest, self.router, self.metrics, tokenizer, controller)
        self.kv_capacity = (min(manifest.pools[p].num_kv_blocks for p in manifest.kv_pools)  # type: ignore[index]
                            * manifest.kv_cache.block_size)
        self.created = int(time.time())
        self._inflight = 0

    # -- controller state ---------------------------------------------------------------
    async def refresh(self) -> None:
        state = await asyncio.wait_for(self.controller.get_state.remote(), timeout=5)
        self.router.update(state)
        self.metrics.update_workers(state["pools"])

    async def refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving on the last snapshot
                logger.warning("controller state refresh failed: %s", e)
            await asyncio.sleep(STATE_REFRESH_S)

    def healthy(self) -> bool:
        return all(self.router.healthy(pool) for pool in self.m.pools)

    # -- request building ---------------------------------------------------------------
    def _params(self, req: CommonParams, prompt_len: int, default_max: int | None) -> SamplingParams:
        if prompt_len >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {prompt_len} tokens; the model's context is {self.max_model_len} "
                "tokens and at least one must be left to generate", param="prompt")
        room = self.max_model_len - prompt_len
        max_tokens = req.max_tokens if req.max_tokens is not None else default_max
        if max_tokens is None:
            max_tokens = min(room, max(1, self.kv_capacity - prompt_len))
        if max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                f"model's context of {self.max_model_len}; allowed: 1..{room}", param="max_tokens")
        if prompt_len + max_tokens > self.kv_capacity:
            raise InvalidRequestError(
                f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs more KV than a worker "
                f"holds ({self.kv_capacity} tokens); lower max_tokens", param="max_tokens")
        vocab = self.tokenizer.vocab_size
        bad = [t for t in req.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad} outside the vocabulary 0..{vocab - 1}",
                                      param="stop_token_ids")
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=req.seed, max_tokens=max_tokens, stop_token_ids=req.stop_token_ids,
                              ignore_eos=req.ignore_eos)

    def _check_model(self, req: CommonParams) -> None:
        if req.model != self.m.model.name:
            raise ModelNotFoundError(f"model {req.model!r} does not exist; served: {self.m.model.name!r}",
                                     param="model", code="model_not_found")

    def _admit(self) -> None:
        if self._inflight >= self.m.server.max_waiting_requests:
            raise OverloadedError(f"{self._inflight} requests in flight (limit "
                                  f"{self.m.server.max_waiting_requests}); retry later")

    def completion_request(self, body: object) -> tuple[CompletionRequest, GenRequest]:
        req: CompletionRequest = parse_request(CompletionRequest, body)
        self._check_model(req)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.tokenizer.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
                raise InvalidRequestError(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            ids = list(prompt)
        return req, GenRequest(ids, self._params(req, len(ids), 16), req.stop or [])

    def chat_request(self, body: object) -> tuple[ChatCompletionRequest, GenRequest]:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
        self._check_model(req)
        if req.max_tokens is None and req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = self.tokenizer.encode_chat(msgs)
        return req, GenRequest(ids, self._params(req, len(ids), None), req.stop or [])

    # -- responses ----------------------------------------------------------------------
    async def respond(self, kind: str, req: CommonParams, greq: GenRequest, t_in: float | None = None) -> Response:
        self._admit()
        self._inflight += 1
        usage = Usage()
        stream = self.gen.generate(greq, usage)
        try:
            first = await stream.__anext__()  # errors before any output become HTTP errors
        except StopAsyncIteration:
            first = Delta("", [], "stop")
        except BaseException:
            self._inflight -= 1
            await stream.aclose()
            raise
        rid = greq.request_id.replace("req-", "cmpl-" if kind == "completion" else "chatcmpl-")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(kind, rid, req, first, stream, usage, include_usage),
                                     media_type="text/event-stream")
        try:
            text, reason, ids = first.text, first.finish_reason, list(first.token_ids)
            async for d in stream:
                text += d.text
                ids += d.token_ids
                reason = d.finish_reason or reason
        finally:
            self._inflight -= 1
            await stream.aclose()
        body = self._body(kind, rid, req, text, reason, usage.as_dict(), final=True, token_ids=ids)
        timing = f"worker;dur={usage.worker_s * 1e3:.3f}"
        if t_in is not None and usage.first_token_at and reason is not None and len(ids) == 1:
            # Single-token requests: time spent in this process's own code (validation,
            # tokenizing, routing, response), apart from the worker RPC.
            ingress_s = (usage.dispatched_at - t_in) + (time.monotonic() - usage.first_token_at)
            rpc_s = usage.first_token_at - usage.dispatched_at - usage.worker_s
            timing += f", ingress;dur={ingress_s * 1e3:.3f}, rpc;dur={rpc_s * 1e3:.3f}"
        return JSONResponse(body, headers={"Server-Timing": timing})

    def _body(self, kind: str, rid: str, req: CommonParams, text: str, reason: str | None,
              usage: dict[str, int] | None, final: bool, first_chunk: bool = False,
              token_ids: list[int] | None = None) -> dict[str, Any]:
        if kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        elif final and not req.stream:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": reason, "logprobs": None}
            obj = "chat.completion"
        else:
            delta: dict[str, Any] = {"content": text}
            if first_chunk:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            obj = "chat.completion.chunk"
        if req.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        body: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()),
                                "model": req.model, "choices": [choice]}
        if usage is not None:
            body["usage"] = usage
        return body

    async def _sse(self, kind: str, rid: str, req: CommonParams, first: Delta,
                   stream: AsyncIterator[Delta], usage: Usage, include_usage: bool) -> AsyncIterator[bytes]:
        try:
            yield _sse(self._body(kind, rid, req, first.text, first.finish_reason, None, False, True,
                                  first.token_ids))
            if first.finish_reason is None:
                try:
                    async for d in stream:
                        yield _sse(self._body(kind, rid, req, d.text, d.finish_reason, None, False,
                                              token_ids=d.token_ids))
                except SplitServeError as e:
                    yield _sse(e.to_openai())
                    return
            if include_usage:
                body = self._body(kind, rid, req, "", None, usage.as_dict(), False)
                body["choices"] = []
                yield _sse(body)
            yield b"data: [DONE]\n\n"
        finally:
            self._inflight -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]


def build_app(ingress: Ingress) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ingress.refresh()
        task = asyncio.get_running_loop().create_task(ingress.refresh_loop())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="splitserve", lifespan=lifespan)

    @app.exception_handler(SplitServeError)
    async def _err(_: Request, e: SplitServeError) -> JSONResponse:
        return error_response(e)

    async def body_of(request: Request) -> object:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"request body is not valid JSON: {e}") from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t_in = time.monotonic()
        req, greq = ingress.completion_request(await body_of(request))
        return await ingress.respond("completion", req, greq, t_in)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req, greq = ingress.chat_request(await body_of(request))
        return await ingress.respond("chat", req, greq)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": ingress.m.model.name, "object": "model",
                                            "created": ingress.created, "owned_by": "splitserve",
                                            "max_model_len": ingress.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if ingress.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ingress.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
