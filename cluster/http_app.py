"""The ingress's HTTP app (FastAPI): OpenAI routes, errors as OpenAI error objects, the
request guard (cluster/http_guard.py), the OpenAPI schema. The request handling is
cluster/ingress.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from cluster.errors import InvalidRequestError, OverloadedError, SplitServeError
from cluster.http_guard import RequestGuard, api_keys
from cluster.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from cluster.ingress import Ingress

logger = logging.getLogger(__name__)

# How often a non-streamed request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.5


def error_response(e: SplitServeError) -> JSONResponse:
    headers = {}
    if isinstance(e, OverloadedError):
        headers["Retry-After"] = str(e.retry_after_s)
    return JSONResponse(e.to_openai(), status_code=e.status_code, headers=headers)



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
    keys = api_keys(ingress.m.api_keys_path())
    if keys:
        logger.info("API keys required (%d accepted) on every endpoint but /health", len(keys))

    def refuse(path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """Overload refusal before the request reaches FastAPI (cluster/http_guard.py)."""
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return None
        try:
            ingress.refuse_early()
        except OverloadedError as e:
            return 429, json.dumps(e.to_openai()).encode(), [(b"retry-after", str(e.retry_after_s).encode())]
        return None

    app.add_middleware(RequestGuard, max_body_bytes=ingress.m.server.max_request_bytes, keys=keys, refuse=refuse)

    @app.exception_handler(SplitServeError)
    async def _err(_: Request, e: SplitServeError) -> JSONResponse:
        return error_response(e)

    async def body_of(request: Request) -> object:
        # refuse_early ran before the request reached FastAPI (RequestGuard); again now:
        # in a burst, every request passes that check before any is admitted (reading a
        # body yields to the loop), and by now the ones ahead are counted.
        raw = await request.body()
        ingress.refuse_early()
        ingress.metrics.bodies.inc()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"request body is not valid JSON: {e}") from None

    async def unless_gone(request: Request, work: Any) -> Response:
        """Run work (a respond()) but cancel it once the client has disconnected, so a
        non-streamed request whose client left frees its workers and KV at once."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                logger.info("client of %s %s left; request cancelled", request.method, request.url.path)
                return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t_in = time.monotonic()
        req, jobs = ingress.completion_request(await body_of(request))
        return await unless_gone(request, ingress.respond("completion", req, jobs, t_in))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req, jobs = ingress.chat_request(await body_of(request))
        return await unless_gone(request, ingress.respond("chat", req, jobs))

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
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies that the handlers parse themselves (strictly,
    from the protocol models) and the error object, so that clients and fuzzers
    (schemathesis) see the real API."""
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
    for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(body.pop("$defs", {}))
        comps[model.__name__] = body
        op = schema["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        op["responses"] = {"200": {"description": "The completion (JSON, or server-sent events with stream)"},
                           **{code: {"description": what, **err} for code, what in (
                               ("400", "Invalid request"), ("401", "Missing or wrong API key"),
                               ("404", "Unknown model"), ("413", "Body over server.max_request_bytes"),
                               ("429", "Overloaded (Retry-After)"), ("503", "No healthy pool"))}}
    app.openapi_schema = schema
    return schema
