"""The ingress's HTTP app: OpenAI routes, errors as OpenAI error objects, the request guard
(cluster/http_guard.py), the OpenAPI schema. The request handling is cluster/ingress.py.

The two hot endpoints (``POST /v1/completions``, ``POST /v1/chat/completions``) are a plain
ASGI app (``HotPath``) that the outermost app (``IngressApp``) calls directly: no
middleware stack, routing, dependency solving or response classes per request (their
cost was most of the ingress's own time, benchmarks/results/2026-12-06-path). It does what
the FastAPI route did, in the same order: the guard's checks (401, 429, 400/413 by
Content-Length, 413 while reading), the body read once, the same strict validation
(cluster/protocol.py), the same OpenAI error objects and status codes, the same headers.
Everything else (other paths, other methods: 405 on the hot paths) goes through FastAPI,
where the hot paths are also routed (to the same HotPath) and documented in the OpenAPI
schema."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cluster.choices import Job, Reply
from cluster.errors import OverloadedError, SplitServeError
from cluster.heap import freeze_startup_heap
from cluster.http_guard import HOLD_KEY, Refusal, RequestGuard, api_keys, release_held, respond
from cluster.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from cluster.ingress import Ingress

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOT = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream; charset=utf-8")


def error_response(e: SplitServeError) -> JSONResponse:
    headers = {}
    if isinstance(e, OverloadedError):
        headers["Retry-After"] = str(e.retry_after_s)
    return JSONResponse(e.to_openai(), status_code=e.status_code, headers=headers)


# One encoder for every body (json.dumps with these arguments builds one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _json(obj: object) -> bytes:
    """As starlette's JSONResponse renders a body."""
    return _ENCODER.encode(obj).encode("utf-8")


async def _send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode()), _JSON]})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, e: SplitServeError) -> None:
    headers = [(b"retry-after", str(e.retry_after_s).encode())] if isinstance(e, OverloadedError) else []
    await _send_json(send, e.status_code, _json(e.to_openai()), headers)


def _server_timing(jobs: list[Job], t_in: float) -> bytes:
    """The Server-Timing header: the worker's own time; for a single-token request also
    this process's own time from the request's arrival here to its response encoded
    (guard, body, validation, tokenizing, routing, response), apart from the prefill
    call, and that call's parts (benchmarks/overhead.py reads them)."""
    usage = jobs[0].usage
    timing = f"worker;dur={usage.worker_s * 1e3:.3f}"
    c0 = jobs[0].choices[0]
    if usage.first_token_at and c0.reason is not None and len(c0.token_ids) == 1:
        ingress_s = (usage.dispatched_at - t_in) + (time.monotonic() - usage.first_token_at)
        rpc_s = usage.first_token_at - usage.dispatched_at - usage.worker_s
        timing += (f", ingress;dur={ingress_s * 1e3:.3f}, rpc;dur={rpc_s * 1e3:.3f}"
                   f", rpc_in;dur={usage.rpc_in_s * 1e3:.3f}, publish;dur={usage.publish_s * 1e3:.3f}"
                   f", rpc_out;dur={usage.rpc_out_s * 1e3:.3f}")
    return timing.encode()


class _Watch:
    """Cancels the request's task when its client disconnects, so that a request whose
    client left frees its workers and KV at once. Once the body is read, the server's
    receive() returns only then (or once the response is complete).

    The watcher task starts in the event loop's next turn, i.e. once the request's task
    first waits (for the prefill worker, its request sent): not between the request's
    arrival and its dispatch. A disconnect before then is still seen (receive() returns
    it)."""

    __slots__ = ("task", "watcher", "gone", "stopped", "_starting")

    def __init__(self, receive: Receive) -> None:
        self.task = asyncio.current_task()
        self.gone = False
        self.stopped = False
        self.watcher: asyncio.Future[Message] | None = None
        self._starting: asyncio.Handle | None = asyncio.get_running_loop().call_soon(self._start, receive)

    def _start(self, receive: Receive) -> None:
        self._starting = None
        if self.stopped:
            return
        self.watcher = asyncio.ensure_future(receive())
        self.watcher.add_done_callback(self._seen)

    def _seen(self, w: asyncio.Future[Message]) -> None:
        if self.stopped or w.cancelled() or w.exception() is not None:
            return
        if w.result().get("type") == "http.disconnect" and self.task is not None:
            self.gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.stopped = True
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self.watcher is not None:
            self.watcher.cancel()


class HotPath:
    """POST /v1/completions and /v1/chat/completions as a plain ASGI app (module doc)."""

    def __init__(self, ingress: Ingress, guard: RequestGuard) -> None:
        self.ingress = ingress
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t_in = time.monotonic()
        refused: Refusal | bytes | None = self.guard.check(scope)
        if refused is not None:
            await respond(send, *refused)
            return
        try:  # past the early check the request holds an admission ticket: released at the end at the latest
            await self._checked(scope, receive, send, t_in)
        finally:
            release_held(scope)

    async def _checked(self, scope: Scope, receive: Receive, send: Send, t_in: float) -> None:
        refused = await self.guard.read_body(receive)
        if refused is None:
            return  # the client left
        if isinstance(refused, tuple):
            await respond(send, *refused)
            return
        raw, ingress, kind = refused, self.ingress, HOT[scope["path"]]
        watch: _Watch | None = None
        try:
            # refuse_early ran in the guard's check; again now, holding the ticket it gave:
            # by now more requests may be queued ahead.
            scope[HOLD_KEY] = ingress.refuse_early(holding=scope.get(HOLD_KEY))
            ingress.metrics.bodies.inc()
            # The raw body: parsed and validated in one pass (cluster.protocol.parse_json_request).
            req, jobs = ingress.completion_request(raw) if kind == "completion" else ingress.chat_request(raw)
            watch = _Watch(receive)
            reply = await ingress.respond(kind, req, jobs, ticket=scope.get(HOLD_KEY), arrived=t_in)
            if reply.events is not None:
                await self._stream(send, reply.events, watch)
                return
            watch.stop()
            await self._whole(send, reply, t_in)
        except SplitServeError as e:
            if watch is not None:
                watch.stop()
            await _send_error(send, e)
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                raise
            if watch.task is not None:
                watch.task.uncancel()
            logger.info("client of POST %s left; request cancelled", scope["path"])
        finally:
            if watch is not None:
                watch.stop()

    @staticmethod
    async def _whole(send: Send, reply: Reply, t_in: float) -> None:
        body = _json(reply.body)
        headers = []
        if len(reply.jobs) == 1 and len(reply.jobs[0].choices) == 1:
            headers.append((b"server-timing", _server_timing(reply.jobs, t_in)))
        await _send_json(send, 200, body, headers)

    @staticmethod
    async def _stream(send: Send, events: AsyncIterator[bytes], watch: _Watch) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [_SSE]})
            async for chunk in events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watch.stop()  # the response's end wakes the watcher: not a disconnect
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await events.aclose()  # type: ignore[attr-defined]


class IngressApp:
    """The outermost ASGI app: a POST to a hot path goes straight to HotPath; everything
    else (lifespan too) to the FastAPI app."""

    def __init__(self, app: FastAPI, hot: HotPath) -> None:
        self.app = app
        self.hot = hot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in HOT:
            await self.hot(scope, receive, send)  # an exception: the server logs it, 500 if nothing was sent
            return
        await self.app(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        return self.app.openapi()


def build_app(ingress: Ingress) -> IngressApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ingress.refresh()
        freeze_startup_heap("ingress")
        task = asyncio.get_running_loop().create_task(ingress.refresh_loop())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="splitserve", lifespan=lifespan)
    keys = api_keys(ingress.m.api_keys_path())
    if keys:
        logger.info("API keys required (%d accepted) on every endpoint but /health", len(keys))

    def refuse(scope: Scope) -> Refusal | None:
        """Overload refusal before the request's body is read (cluster/http_guard.py); a
        request let through holds an admission ticket until its exact check."""
        if scope.get("path") not in HOT:
            return None
        try:
            scope[HOLD_KEY] = ingress.refuse_early(holding=scope.get(HOLD_KEY))
        except OverloadedError as e:
            return 429, json.dumps(e.to_openai()).encode(), [(b"retry-after", str(e.retry_after_s).encode())]
        return None

    max_bytes = ingress.m.server.max_request_bytes
    app.add_middleware(RequestGuard, max_body_bytes=max_bytes, keys=keys, refuse=refuse)
    hot = HotPath(ingress, RequestGuard(None, max_bytes, keys, refuse))
    for path in HOT:  # reached through FastAPI only when not through IngressApp; 405 for other methods
        app.router.add_route(path, hot, methods=["POST"], include_in_schema=False)

    @app.exception_handler(SplitServeError)
    async def _err(_: Request, e: SplitServeError) -> JSONResponse:
        return error_response(e)

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

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return IngressApp(app, hot)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of its routes plus the two hot endpoints (a plain ASGI app, which
    FastAPI does not document): their request bodies (parsed strictly, from the protocol
    models), responses and the error object, so that clients and fuzzers (schemathesis)
    see the real API."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version="1", routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    comps["ErrorResponse"] = error
    hot_paths: dict[str, Any] = {}
    for path, model, name in (("/v1/completions", CompletionRequest, "completions"),
                              ("/v1/chat/completions", ChatCompletionRequest, "chat")):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(body.pop("$defs", {}))
        comps[model.__name__] = body
        err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        hot_paths[path] = {"post": {
            "summary": name.capitalize(),
            "operationId": f"{name}{path.replace('/', '_')}_post",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
            "responses": {"200": {"description": "The completion (JSON, or server-sent events with stream)"},
                          **{code: {"description": what, **err} for code, what in (
                              ("400", "Invalid request"), ("401", "Missing or wrong API key"),
                              ("404", "Unknown model"), ("413", "Body over server.max_request_bytes"),
                              ("429", "Overloaded (Retry-After)"), ("503", "No healthy pool"))}}}}
    schema["paths"] = {**hot_paths, **schema.get("paths", {})}
    app.openapi_schema = schema
    return schema
