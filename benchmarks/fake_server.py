"""A stub OpenAI-compatible server with known latencies, to check the load client and the
bench end to end without Ray or a model: the first token comes `ttft_s` after the request,
then one token every `tpot_s`. Requests whose prompt holds token id 666 fail with a 500,
and those holding 777 stall (to exercise timeouts).

    python -m benchmarks.fake_server --port 8100 --ttft-ms 50 --tpot-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

FAIL_ID = 1
STALL_ID = 2


def build_app(ttft_s: float, tpot_s: float) -> FastAPI:
    app = FastAPI()
    served = {"n": 0}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "bench-tests"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(f"# TYPE fake_requests counter\nfake_requests_total {served['n']}\n",
                        media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        prompt = body.get("prompt")
        ids = prompt if isinstance(prompt, list) else []
        if ids[:1] == [FAIL_ID]:
            return JSONResponse({"error": {"message": "injected failure", "type": "internal_error",
                                           "param": None, "code": None}}, status_code=500)
        n = int(body.get("max_tokens") or 16)
        plen = len(ids) if ids else len(str(prompt).split())
        served["n"] += 1

        async def stream() -> AsyncIterator[bytes]:
            start = time.perf_counter()
            if ids[:1] == [STALL_ID]:
                await asyncio.sleep(3600)
            for i in range(n):
                # Sleep to absolute deadlines so that the stub's own jitter does not add up.
                delay = start + ttft_s + i * tpot_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                chunk = {"id": "cmpl-x", "object": "text_completion", "model": "fake",
                         "choices": [{"index": 0, "text": f" t{i}",
                                      "finish_reason": "length" if i == n - 1 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            usage = {"prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n}
            yield f"data: {json.dumps({'id': 'cmpl-x', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class FakeServer:
    """The stub in a background thread on a free loopback port."""

    def __init__(self, ttft_s: float = 0.05, tpot_s: float = 0.01) -> None:
        config = uvicorn.Config(build_app(ttft_s, tpot_s), host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 20.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--ttft-ms", type=float, default=50)
    p.add_argument("--tpot-ms", type=float, default=20)
    a = p.parse_args()
    uvicorn.run(build_app(a.ttft_ms / 1e3, a.tpot_ms / 1e3), host="127.0.0.1", port=a.port)


if __name__ == "__main__":
    main()
