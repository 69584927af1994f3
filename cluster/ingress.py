"""OpenAI-compatible HTTP ingress (FastAPI): validates, tokenizes, hands requests to the
Generator and speaks SSE. The only module that knows HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.admission import RecentPrompts, Ticket, Unadmitted, queue_refusal
from cluster.errors import (InvalidRequestError, ModelNotFoundError, OverloadedError,
                            SplitServeError)
from cluster.generation import Delta, GenRequest, Generator, Usage
from cluster.heap import freeze_startup_heap
from cluster.http_guard import HOLD_KEY, RequestGuard, api_keys
from cluster.logprobs import LogprobsBuilder
from cluster.tools import ToolPlan
from cluster.manifest import Manifest
from cluster.metrics import Metrics
from cluster.protocol import ChatCompletionRequest, CommonParams, CompletionRequest, parse_request
from cluster.router import Router
from engine.sequence import SamplingParams

logger = logging.getLogger(__name__)

STATE_REFRESH_S = 0.5
# How often a non-streamed request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.5


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
        self.metrics = Metrics(manifest.model.name)
        self.router = Router(manifest.kv_cache.block_size)
        self.gen = Generator(manifest, self.router, self.metrics, tokenizer, controller)
        self.kv_capacity = (min(manifest.pools[p].num_kv_blocks for p in manifest.kv_pools)  # type: ignore[index]
                            * manifest.kv_cache.block_size)
        self.created = int(time.time())
        self._inflight = 0
        self.recent_prompts = RecentPrompts()  # what refuse_early assumes of a request not yet parsed
        self.unadmitted = Unadmitted()  # past refuse_early, not yet at the exact check
        # Structured output: the grammar engine's tokenizer (built on first use) and the
        # grammars of recent requests, checked once.
        self._gtok: Any = None
        self._grammars: dict[tuple[str | None, str], str] = {}
        self.ingress_id = f"ingress-{uuid.uuid4().hex[:12]}"
        self.manifest_version = 0

    # -- controller state ---------------------------------------------------------------
    async def refresh(self) -> None:
        # The controller learns which workers this ingress still holds requests on (it
        # drains a retiring worker by them) and on which snapshot it routes.
        state = await asyncio.wait_for(self.controller.get_state.remote(
            self.ingress_id, self.router.version, self.router.held(),
            (self.gen.refused_requests, self.gen.refused_prompt_tokens)), timeout=5)
        if state.get("manifest_version", 0) != self.manifest_version:
            await self._take_manifest(state["manifest_version"])
        self.router.update(state)
        self.metrics.update_workers(state["pools"])
        self.metrics.update_autoscale(state.get("autoscale") or {})

    async def _take_manifest(self, version: int) -> None:
        """A manifest applied live (splitserve apply): SLOs, limits and timeouts from now on."""
        data = await asyncio.wait_for(self.controller.get_manifest.remote(), timeout=5)
        m = Manifest.model_validate_json(data)
        m.base_dir = self.m.base_dir
        self.m = self.gen.m = m
        self.kv_capacity = min(p.num_kv_blocks for p in m.pools.values()) * m.kv_cache.block_size
        self.manifest_version = version
        logger.info("took manifest version %d", version)

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
    def _params(self, req: CommonParams, prompt_len: int, default_max: int | None,
                structured: tuple[str, str, Any] | None = None) -> SamplingParams:
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
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        bad = [t for t in bias if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"logit_bias token ids {bad} outside the vocabulary 0..{vocab - 1}",
                                      param="logit_bias")
        if req.min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}",
                                      param="min_tokens")
        logprobs, prompt_logprobs = req.logprob_counts()
        grammar = self._grammar(req, structured)
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=req.seed, max_tokens=max_tokens, stop_token_ids=req.stop_token_ids,
                              ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
                              logit_bias=bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              grammar=grammar)

    def _grammar(self, req: CommonParams, structured: tuple[str, str, Any] | None = None) -> str | None:
        """The llguidance grammar of a structured-output request, checked against the
        model's tokenizer (a bad schema, regex or grammar is a 400 naming its field)."""
        name, kind, value = structured or req.structured()
        if name is None:
            return None
        key = (kind, json.dumps(value, sort_keys=True))
        grammar = self._grammars.get(key)
        if grammar is None:
            from engine.guided import GrammarTokenizer, grammar_for

            if self._gtok is None:
                self._gtok = GrammarTokenizer(self.m.model_dir())
            try:
                grammar = grammar_for(str(kind), value)
            except ValueError as e:
                raise InvalidRequestError(f"{name}: {e}", param=name) from None
            problem = self._gtok.check(grammar)
            if problem:
                raise InvalidRequestError(f"{name}: {problem.strip()}", param=name)
            if len(self._grammars) > 256:
                self._grammars.clear()
            self._grammars[key] = grammar
        return grammar

    def _check_model(self, req: CommonParams) -> None:
        if req.model != self.m.model.name:
            raise ModelNotFoundError(f"model {req.model!r} does not exist; served: {self.m.model.name!r}",
                                     param="model", code="model_not_found")

    def _check_inflight(self) -> None:
        if self._inflight >= self.m.server.max_waiting_requests:
            self.metrics.rejected.labels("inflight").inc()
            raise OverloadedError(f"{self._inflight} requests in flight (limit "
                                  f"{self.m.server.max_waiting_requests}); retry later")

    def refuse_early(self, holding: Ticket | None = None) -> Ticket | None:
        """Before a request's body is read (and again once it is, holding the ticket the first
        check gave): 429 if the in-flight limit is reached or the queue, the requests past this
        check and not yet admitted (each as the shortest recent prompt) and the request itself
        predict a TTFT miss (cluster/admission.py). Under a burst most refusals end here,
        costing no parse, tokenization or Ray call. Passing the first check gives a ticket: the
        request counts among the unadmitted until its exact check (``respond``) or its end
        releases it."""
        self._check_inflight()
        if not self.m.server.ttft_admission:
            return holding
        a, b = self.gen.ttft_model.coefficients()
        short = self.recent_prompts.short()
        others = self.unadmitted.count - (holding is not None)
        refusal = queue_refusal(self.gen.predict_ttft(short, others * short), self.m.slo.ttft_ms, a, b, short)
        if refusal is not None:
            if holding is not None:
                holding.release()
            self.metrics.rejected.labels("ttft_queue").inc()
            raise OverloadedError(*refusal)
        return holding if holding is not None else self.unadmitted.ticket()

    def _admit(self, jobs: list[Job], ticket: Ticket | None = None) -> None:
        if ticket is not None:
            ticket.release()  # the exact check below counts this request by its own prompt
        self.recent_prompts.observe(sum(len(job.greq.prompt_token_ids) for job in jobs))
        self._check_inflight()
        self.gen.admit([job.greq for job in jobs])

    def _job(self, req: CommonParams, ids: list[int], default_max: int | None, first_index: int,
             best_of: int | None = None, echo: str | None = None, tools: ToolPlan | None = None) -> Job:
        schema = None if tools is None else tools.schema()
        structured = None if schema is None else ("tool_choice", "json_schema", schema)
        params = self._params(req, len(ids), default_max, structured)
        count = best_of or req.n
        want_logprobs = params.logprobs is not None
        if count > req.n and params.logprobs is None:
            params.logprobs = 0  # best_of ranks by cumulative logprob
        # Choice j draws from seed + j: the same as a single request with that seed.
        more = [dataclasses.replace(params, seed=None if params.seed is None else params.seed + j)
                for j in range(1, count)]
        greq = GenRequest(ids, params, req.stop or [], more=more)
        return Job(greq, first_index, req.n, echo, want_logprobs, tools)

    def completion_request(self, body: object) -> tuple[CompletionRequest, list[Job]]:
        req: CompletionRequest = parse_request(CompletionRequest, body)
        self._check_model(req)
        jobs: list[Job] = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
            else:
                vocab = self.tokenizer.vocab_size
                if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
                    raise InvalidRequestError(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
                ids = list(prompt)
            echo = None
            if req.echo:
                echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
            jobs.append(self._job(req, ids, 16, i * req.n, req.best_of, echo))
        return req, jobs

    def chat_request(self, body: object) -> tuple[ChatCompletionRequest, list[Job]]:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
        self._check_model(req)
        if req.max_tokens is None and req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        msgs = [m.for_template() for m in req.messages]
        plan = self._tool_plan(req)
        uses_tools = any(m.tool_calls is not None or m.role == "tool" for m in req.messages)
        if (plan is not None or uses_tools) and not self.tokenizer.supports_tools:
            raise InvalidRequestError(
                f"model {self.m.model.name!r} does not support tools: its chat template does not render "
                "them", param="tools" if plan is not None else "messages", code="tools_not_supported")
        ids = self.tokenizer.encode_chat(msgs, tools=None if plan is None else plan.tools)
        return req, [self._job(req, ids, None, 0, tools=plan)]

    @staticmethod
    def _tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
        if not req.tools:
            return None
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        choice = req.tool_choice or "auto"
        parallel = req.parallel_tool_calls is not False
        if isinstance(choice, str):
            plan = ToolPlan(choice, tools, parallel=parallel)
        else:
            plan = ToolPlan("named", tools, name=choice.function.name, parallel=parallel)
        if plan.schema() is not None and req.structured()[0] is not None:
            raise InvalidRequestError(f"tool_choice {choice if isinstance(choice, str) else 'function'} and "
                                      f"{req.structured()[0]} both constrain the output; set one",
                                      param="tool_choice")
        return plan

    # -- responses ----------------------------------------------------------------------
    async def respond(self, kind: str, req: CommonParams, jobs: list[Job],
                      t_in: float | None = None, ticket: Ticket | None = None) -> Response:
        arrived = t_in if t_in is not None else time.monotonic()
        for job in jobs:
            job.greq.arrived_at = arrived
        self._admit(jobs, ticket)
        self._inflight += 1
        for job in jobs:
            job.start(self.gen, self.tokenizer, kind)
        try:
            # Errors before any output become HTTP errors.
            firsts = await asyncio.gather(*(job.first() for job in jobs))
        except BaseException:
            self._inflight -= 1
            for job in jobs:
                await job.close()
            raise
        rid = jobs[0].greq.request_id.replace("req-", "cmpl-" if kind == "completion" else "chatcmpl-")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(kind, rid, req, jobs, firsts, include_usage),
                                     media_type="text/event-stream")
        try:
            await asyncio.gather(*(job.collect(first) for job, first in zip(jobs, firsts)))
        finally:
            self._inflight -= 1
            for job in jobs:
                await job.close()
        choices = [c.final_choice(kind, req) for job in jobs for c in job.returned()]
        body = self._body(kind, rid, req, choices, _usage(jobs))
        headers = {}
        if len(jobs) == 1 and len(jobs[0].choices) == 1:
            usage, c0 = jobs[0].usage, jobs[0].choices[0]
            timing = f"worker;dur={usage.worker_s * 1e3:.3f}"
            if (t_in is not None and usage.first_token_at and c0.reason is not None
                    and len(c0.token_ids) == 1):
                # Single-token requests: time spent in this process's own code (validation,
                # tokenizing, routing, response), apart from the worker RPC.
                ingress_s = (usage.dispatched_at - t_in) + (time.monotonic() - usage.first_token_at)
                rpc_s = usage.first_token_at - usage.dispatched_at - usage.worker_s
                timing += (f", ingress;dur={ingress_s * 1e3:.3f}, rpc;dur={rpc_s * 1e3:.3f}"
                           f", rpc_in;dur={usage.rpc_in_s * 1e3:.3f}, publish;dur={usage.publish_s * 1e3:.3f}"
                           f", rpc_out;dur={usage.rpc_out_s * 1e3:.3f}")
            headers["Server-Timing"] = timing
        return JSONResponse(body, headers=headers)

    def _body(self, kind: str, rid: str, req: CommonParams, choices: list[dict[str, Any]],
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

    async def _sse(self, kind: str, rid: str, req: CommonParams, jobs: list[Job],
                   firsts: list[Delta], include_usage: bool) -> AsyncIterator[bytes]:
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
                yield _sse(self._body(kind, rid, req, [job.chunk(kind, req, firsts[0])], None))
                try:
                    async for d in job.rest():
                        yield _sse(self._body(kind, rid, req, [job.chunk(kind, req, d)], None))
                except SplitServeError as e:
                    yield _sse(e.to_openai())
                    return
                if include_usage:
                    yield _sse(self._body(kind, rid, req, [], _usage(jobs)))
                yield b"data: [DONE]\n\n"
                return
            for job, first in zip(jobs, firsts):
                yield _sse(self._body(kind, rid, req, [job.chunk(kind, req, first)], None))
                tasks.append(asyncio.get_running_loop().create_task(pump(job)))
            running = len(tasks)
            while running:
                job, item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, SplitServeError):
                    yield _sse(item.to_openai())
                    return
                yield _sse(self._body(kind, rid, req, [job.chunk(kind, req, item)], None))
            if include_usage:
                yield _sse(self._body(kind, rid, req, [], _usage(jobs)))
            yield b"data: [DONE]\n\n"
        finally:
            self._inflight -= 1
            for t in tasks:
                t.cancel()
            for job in jobs:
                with contextlib.suppress(Exception):
                    await job.close()


def _usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(job.usage.prompt_tokens for job in jobs)
    completion = sum(job.usage.completion_tokens for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


def build_app(ingress: Ingress) -> FastAPI:
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

    def refuse(scope: dict[str, Any]) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """Overload refusal before the request reaches FastAPI (cluster/http_guard.py); a
        request let through holds an admission ticket until its exact check."""
        if scope.get("path") not in ("/v1/completions", "/v1/chat/completions"):
            return None
        try:
            scope[HOLD_KEY] = ingress.refuse_early()
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
        request.scope[HOLD_KEY] = ingress.refuse_early(holding=request.scope.get(HOLD_KEY))
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
        work = ingress.respond("completion", req, jobs, t_in, request.scope.get(HOLD_KEY))
        return await unless_gone(request, work)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        t_in = time.monotonic()
        req, jobs = ingress.chat_request(await body_of(request))
        return await unless_gone(request, ingress.respond("chat", req, jobs, t_in, request.scope.get(HOLD_KEY)))

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
