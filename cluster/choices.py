"""What a completion response is made of: a prompt's generation (Job) and its choices
(Choice: text, token ids, logprobs, tool calls), the response body and its server-sent
events. No HTTP here (cluster/http_app.py sends them); no admission (cluster/ingress.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from cluster.errors import SplitServeError
from cluster.generation import Generator
from cluster.genrequest import Delta, GenRequest, Usage
from cluster.logprobs import LogprobsBuilder
from cluster.protocol import CommonParams
from cluster.tools import ToolPlan


@dataclasses.dataclass
class Reply:
    """A response: its body (a whole response), or its server-sent events (stream); and
    the jobs it answers."""

    body: dict[str, Any] | None
    events: AsyncIterator[bytes] | None
    jobs: list[Job]


def sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def usage_of(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(job.usage.prompt_tokens for job in jobs)
    completion = sum(job.usage.completion_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(kind: str, rid: str, req: CommonParams, choices: list[dict[str, Any]],
                  usage: dict[str, int] | None) -> dict[str, Any]:
    if kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion" if not req.stream else "chat.completion.chunk"
    body: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()),
                            "model": req.model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


async def sse_events(kind: str, rid: str, req: CommonParams, jobs: list[Job], firsts: list[Delta],
                     include_usage: bool, on_end: Callable[[], None]) -> AsyncIterator[bytes]:
    """A streamed response's events; on_end() runs once it ends, however it ends."""
    queue: asyncio.Queue[tuple[Job, Delta | SplitServeError | None]] = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async for d in job.rest():
                await queue.put((job, d))
        except SplitServeError as e:
            await queue.put((job, e))
            return
        await queue.put((job, None))

    tasks: list[asyncio.Task[None]] = []
    try:
        if len(jobs) == 1:  # one prompt (the usual case): its deltas straight, no pump task
            job = jobs[0]
            yield sse(response_body(kind, rid, req, [job.chunk(kind, req, firsts[0])], None))
            try:
                async for d in job.rest():
                    yield sse(response_body(kind, rid, req, [job.chunk(kind, req, d)], None))
            except SplitServeError as e:
                yield sse(e.to_openai())
                return
            if include_usage:
                yield sse(response_body(kind, rid, req, [], usage_of(jobs)))
            yield b"data: [DONE]\n\n"
            return
        for job, first in zip(jobs, firsts):
            yield sse(response_body(kind, rid, req, [job.chunk(kind, req, first)], None))
            tasks.append(asyncio.get_running_loop().create_task(pump(job)))
        running = len(tasks)
        while running:
            job, item = await queue.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, SplitServeError):
                yield sse(item.to_openai())
                return
            yield sse(response_body(kind, rid, req, [job.chunk(kind, req, item)], None))
        if include_usage:
            yield sse(response_body(kind, rid, req, [], usage_of(jobs)))
        yield b"data: [DONE]\n\n"
    finally:
        on_end()
        for t in tasks:
            t.cancel()
        for job in jobs:
            with contextlib.suppress(Exception):
                await job.close()


class Job:
    """One prompt's generation: its choices (n, or best_of of which the n with the highest
    cumulative logprob are returned) share one stream and one prefill."""

    def __init__(self, greq: GenRequest, first_index: int, n: int = 1, echo: str | None = None,
                 want_logprobs: bool = True, tools: ToolPlan | None = None) -> None:
        self.greq = greq
        self.n = n
        self.usage = Usage()
        count = 1 + len(greq.more)
        self.choices = [Choice(first_index + j, greq.prompt_token_ids, echo, tools) for j in range(count)]
        self.want_logprobs = want_logprobs
        self._stream: AsyncIterator[Delta] | None = None
        self._gen: Generator | None = None

    def start(self, gen: Generator, tokenizer: Any, kind: str) -> None:
        self._gen = gen
        self._stream = gen.generate(self.greq, self.usage)
        for c, p in zip(self.choices, [self.greq.params] + self.greq.more):
            if p.logprobs is not None and self.want_logprobs:
                c.lp = LogprobsBuilder(tokenizer, kind, p.logprobs)

    async def first(self) -> Delta:
        assert self._stream is not None
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            return Delta("", [], "stop")

    def rest(self) -> AsyncIterator[Delta]:
        assert self._stream is not None
        return self._stream

    async def collect(self, first: Delta) -> None:
        self.choices[first.index].take(first)
        async for d in self.rest():
            self.choices[d.index].take(d)

    def chunk(self, kind: str, req: CommonParams, d: Delta) -> dict[str, Any]:
        return self.choices[d.index].chunk(kind, req, d)

    def returned(self) -> list[Choice]:
        """The choices to return: all, or the n best by cumulative logprob (best_of)."""
        if len(self.choices) == self.n:
            return self.choices
        best = sorted(self.choices, key=lambda c: -c.cum_logprob)[: self.n]
        first = self.choices[0].index
        for j, c in enumerate(best):
            c.index = first + j
        return best

    async def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.aclose()  # type: ignore[attr-defined]
        if self._gen is not None:  # a generator closed before it ran keeps no reservation
            self._gen.release(self.greq)


class Choice:
    """One choice of a response: its text, token ids, logprobs."""

    def __init__(self, index: int, prompt_token_ids: list[int], echo: str | None = None,
                 tools: ToolPlan | None = None) -> None:
        self.index = index
        # With tools, the text is read for tool calls once complete (a streamed answer
        # comes as one delta at the end).
        self.tools = tools
        self.prompt_token_ids = prompt_token_ids
        self.echo = echo
        self.text = ""
        self.token_ids: list[int] = []
        self.reason: str | None = None
        self.lp: LogprobsBuilder | None = None
        self.cum_logprob = 0.0
        self.started = False

    def take(self, d: Delta) -> dict[str, Any] | None:
        """Adds a delta; returns the logprobs of its tokens in the response's format."""
        text = d.text
        frag = None
        if not self.started and self.echo is not None:
            text = self.echo + text
            if self.lp is not None:
                frag = self.lp.add_prompt(self.prompt_token_ids, d.prompt_logprobs or [], self.echo)
        self.started = True
        if d.logprobs is not None:
            self.cum_logprob += sum(lp[0] for lp in d.logprobs)
            if self.lp is not None:
                frag = self.lp.merge(frag, self.lp.add(d.token_ids, d.logprobs))
        self.text += text
        self.token_ids += d.token_ids
        self.reason = d.finish_reason or self.reason
        d.text = text
        return frag

    def final_choice(self, kind: str, req: CommonParams) -> dict[str, Any]:
        lp = None if self.lp is None else self.lp.whole()
        if kind == "completion":
            choice: dict[str, Any] = {"index": self.index, "text": self.text,
                                      "finish_reason": self.reason, "logprobs": lp}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": self.text}
            reason = self.reason
            if self.tools is not None:
                message["content"], calls = self.tools.parse(self.text)
                if calls:
                    message["tool_calls"] = calls
                    reason = "tool_calls" if reason == "stop" else reason
            choice = {"index": self.index, "message": message, "finish_reason": reason, "logprobs": lp}
        if req.return_token_ids:
            choice["token_ids"] = self.token_ids
        return choice

    def chunk(self, kind: str, req: CommonParams, d: Delta) -> dict[str, Any]:
        first_chunk = not self.started
        frag = self.take(d)
        if kind == "completion":
            choice: dict[str, Any] = {"index": self.index, "text": d.text,
                                      "finish_reason": d.finish_reason, "logprobs": frag}
        else:
            delta: dict[str, Any] = {"content": d.text}
            reason = d.finish_reason
            if self.tools is not None:  # held until the answer is complete
                delta = {"content": ""}
                if reason is not None:
                    content, calls = self.tools.parse(self.text)
                    delta = {"content": content}
                    if calls:
                        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                        reason = "tool_calls" if reason == "stop" else reason
            if first_chunk:
                delta["role"] = "assistant"
            choice = {"index": self.index, "delta": delta, "finish_reason": reason, "logprobs": frag}
        if req.return_token_ids:
            choice["token_ids"] = d.token_ids
        return choice
