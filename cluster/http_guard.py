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
  with a ``release()`` method in ``scope[HOLD_KEY]`` (the ingress's admission ticket):
  released when the request is refused later or ends, if nothing released it before.
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


def _header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value (the last, if repeated)."""
    found = None
    for k, v in scope.get("headers") or ():
        if k == name:
            found = v
    return found


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A whole JSON response."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


Refusal = tuple[int, bytes, list[tuple[bytes, bytes]]]


def release_held(scope: Scope) -> None:
    """Release what refuse() left in the scope for the request (idempotent)."""
    held = scope.pop(HOLD_KEY, None)
    if held is not None:
        held.release()


class RequestGuard:
    """ASGI middleware: API keys, then the body-size limit (see the module doc). ``check``
    and ``read_body`` are the same steps for an ASGI app that reads its own body (the
    ingress's hot path, cluster/http_app.py)."""

    def __init__(self, app: ASGIApp | None, max_body_bytes: int, keys: list[str] | None = None,
                 refuse: Callable[[Scope], Refusal | None] | None = None) -> None:
        self.app = app
        self.refuse = refuse
        self.max_body_bytes = max_body_bytes
        self.keys = [k.encode() for k in keys or []]
        self._too_big = _error(413, f"request body is larger than this server's limit of {max_body_bytes} bytes "
                                    "(server.max_request_bytes)", "invalid_request_error", "request_too_large")

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        token = token.strip()
        # Every key compared, constant time each: no early exit on the first match.
        return any([hmac.compare_digest(token, k) for k in self.keys])

    def check(self, scope: Scope) -> Refusal | None:
        """What is refused before the body is read (401, then for a POST 429 and 400/413 by
        Content-Length); None: go on (a body without Content-Length is checked as read)."""
        if self.keys and scope.get("path") not in OPEN_PATHS and not self._authorized(scope):
            client = scope.get("client") or ("?", 0)
            logger.warning("401 for %s %s from %s: missing or wrong API key", scope.get("method"),
                           scope.get("path"), client[0])
            return 401, _error(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with a key this "
                "server accepts", "invalid_request_error", "invalid_api_key"), [(b"www-authenticate", b"Bearer")]
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return None
        refused = self.refuse(scope) if self.refuse is not None else None
        if refused is not None:
            return refused
        refused = self._check_length(scope)
        if refused is not None:
            release_held(scope)
        return refused

    def _check_length(self, scope: Scope) -> Refusal | None:
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, _error(400, f"Content-Length {length.decode(errors='replace')!r} is not a number",
                                   "invalid_request_error", "bad_request"), []
            if n > self.max_body_bytes:
                return 413, self._too_big, []
        return None

    async def read_body(self, receive: Receive) -> bytes | Refusal | None:
        """The whole body, or 413 as soon as the bytes received pass the limit (at most the
        limit is ever buffered); None if the client left."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body_bytes:
                return 413, self._too_big, []
            chunks.append(body)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.check(scope)
        if refused is not None:
            await respond(send, *refused)
            return
        try:
            await self._checked(scope, receive, send)
        finally:
            release_held(scope)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None
        if scope.get("method") in ("GET", "HEAD", "OPTIONS") or _header(scope, b"content-length") is not None:
            await self.app(scope, receive, send)  # the server reads no more than Content-Length
            return
        # No Content-Length (chunked): read up to the limit, then hand the body on.
        body = await self.read_body(receive)
        if body is None:
            return
        if isinstance(body, tuple):
            await respond(send, *body)
            return
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)
