"""What the ingress checks before a request reaches its handlers (an ASGI middleware):

- **API keys.** With keys configured (``SPLITSERVE_API_KEY`` in the server's environment,
  and/or ``server.api_keys_file`` in the manifest: one key per line, ``#`` comments),
  every path but ``/health`` wants ``Authorization: Bearer <key>``; otherwise 401 with an
  OpenAI error object (``code: invalid_api_key``), as OpenAI answers. Keys are compared
  in constant time. Without keys, nothing is asked.
- **Early refusal.** An ingress may pass ``refuse(scope)``: called for a POST once the key
  is checked, before anything is read; a ``(status, body, headers)`` it returns is sent at
  once (the ingress's overload check: under a burst most 429s end here, costing neither
  FastAPI's routing nor a body read). To let the request through it may leave an object
  with a ``release()`` method in ``scope[HOLD_KEY]`` (the ingress's admission ticket),
  released when the request ends if nothing released it before.
- **Body size.** A body over ``server.max_request_bytes`` gets 413 before it is parsed: at
  once from its ``Content-Length``, or, for a chunked body, as soon as the bytes received
  pass the limit (at most the limit is ever buffered).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV_KEY = "SPLITSERVE_API_KEY"
OPEN_PATHS = frozenset({"/health"})
HOLD_KEY = "splitserve.hold"  # scope key: what refuse() holds for a request it let through

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def read_keys_file(path: Path) -> list[str]:
    """Keys of a keys file: one per line; blank lines and ``#`` comments are skipped."""
    keys = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


def api_keys(keys_file: Path | None, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """The keys the ingress accepts: ``SPLITSERVE_API_KEY`` plus the keys file's."""
    env = os.environ if environ is None else environ
    keys = [env[ENV_KEY].strip()] if env.get(ENV_KEY, "").strip() else []
    if keys_file is not None:
        keys += read_keys_file(keys_file)
    return keys


def _error(status: int, message: str, error_type: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}}).encode()


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: API keys, then the body-size limit (see the module doc)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, keys: list[str] | None = None,
                 refuse: Callable[[Scope], tuple[int, bytes, list[tuple[bytes, bytes]]] | None] | None = None) -> None:
        self.app = app
        self.refuse = refuse
        self.max_body_bytes = max_body_bytes
        self.keys = [k.encode() for k in keys or []]

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        token = token.strip()
        # Every key compared, constant time each: no early exit on the first match.
        return any([hmac.compare_digest(token, k) for k in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.keys and scope.get("path") not in OPEN_PATHS and not self._authorized(scope):
            client = scope.get("client") or ("?", 0)
            logger.warning("401 for %s %s from %s: missing or wrong API key", scope.get("method"),
                           scope.get("path"), client[0])
            await _respond(send, 401, _error(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with a key this "
                "server accepts", "invalid_request_error", "invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        refused = self.refuse(scope) if self.refuse is not None else None
        if refused is not None:
            await _respond(send, *refused)
            return
        try:
            await self._checked(scope, receive, send)
        finally:
            held = scope.pop(HOLD_KEY, None)
            if held is not None:
                held.release()

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The body-size check, then the app."""
        too_big = _error(413, f"request body is larger than this server's limit of {self.max_body_bytes} bytes "
                              "(server.max_request_bytes)", "invalid_request_error", "request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _respond(send, 400, _error(400, f"Content-Length {length.decode(errors='replace')!r} is "
                                                      "not a number", "invalid_request_error", "bad_request"))
                return
            if n > self.max_body_bytes:
                await _respond(send, 413, too_big)
                return
            await self.app(scope, receive, send)  # the server reads no more than Content-Length
            return
        # No Content-Length (chunked): read up to the limit, then hand the body on.
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body_bytes:
                await _respond(send, 413, too_big)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)
