"""The ingress's request handling: controller state, OpenAI requests validated and tokenized
into jobs (cluster/choices.py), admission, the response to a job. The HTTP app around it
is cluster/http_app.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any

from cluster.admission import RecentPrompts, Ticket, Unadmitted, queue_refusal
from cluster.errors import InvalidRequestError, ModelNotFoundError, OverloadedError
from cluster.choices import Job, Reply, response_body, sse_events, usage_of
from cluster.generation import Generator
from cluster.genrequest import GenRequest
from cluster.tools import ToolPlan
from cluster.manifest import Manifest
from cluster.metrics import Metrics
from cluster.protocol import ChatCompletionRequest, CommonParams, CompletionRequest, parse_json_request, parse_request
from cluster.router import Router
from engine.sequence import SamplingParams

logger = logging.getLogger(__name__)

STATE_REFRESH_S = 0.5


class Ingress:
    def __init__(self, manifest: Manifest, controller: Any, tokenizer: Any, max_model_len: int) -> None:
        self.m = manifest
        self.controller = controller
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = int(tokenizer.vocab_size)  # ids, added tokens included (asked once)
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
        vocab = self.vocab_size
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

    @staticmethod
    def _parse(model_cls: type[CommonParams], body: object) -> Any:
        """body: the request's JSON body as bytes (parsed and validated in one pass), or
        parsed."""
        if isinstance(body, (bytes, bytearray)):
            return parse_json_request(model_cls, bytes(body))
        return parse_request(model_cls, body)

    def completion_request(self, body: object) -> tuple[CompletionRequest, list[Job]]:
        req: CompletionRequest = self._parse(CompletionRequest, body)
        self._check_model(req)
        jobs: list[Job] = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
            else:
                vocab = self.vocab_size
                if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
                    raise InvalidRequestError(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
                ids = list(prompt)
            echo = None
            if req.echo:
                echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
            jobs.append(self._job(req, ids, 16, i * req.n, req.best_of, echo))
        return req, jobs

    def chat_request(self, body: object) -> tuple[ChatCompletionRequest, list[Job]]:
        req: ChatCompletionRequest = self._parse(ChatCompletionRequest, body)
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
    async def respond(self, kind: str, req: CommonParams, jobs: list[Job], ticket: Ticket | None = None,
                      arrived: float | None = None) -> Reply:
        """Admit and run the jobs: the whole response, or (stream) its events once the
        first token of every job is there. A SplitServeError raised here (before any
        output) is the HTTP error. ticket: the request's admission ticket (released at its
        exact check); arrived: when the ingress first saw it (admission's headroom learns
        from the time since)."""
        arrived = arrived if arrived is not None else time.monotonic()
        for job in jobs:
            job.greq.arrived_at = arrived
        self._admit(jobs, ticket)
        self._inflight += 1
        for job in jobs:
            job.start(self.gen, self.tokenizer, kind)
        try:
            # One prompt (the usual case) awaited as it is, not in a task of its own.
            firsts = ([await jobs[0].first()] if len(jobs) == 1
                      else await asyncio.gather(*(job.first() for job in jobs)))
        except BaseException:
            self._inflight -= 1
            for job in jobs:
                await job.close()
            raise
        rid = jobs[0].greq.request_id.replace("req-", "cmpl-" if kind == "completion" else "chatcmpl-")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return Reply(None, sse_events(kind, rid, req, jobs, firsts, include_usage, self._stream_ended), jobs)
        try:
            if len(jobs) == 1:
                await jobs[0].collect(firsts[0])
            else:
                await asyncio.gather(*(job.collect(first) for job, first in zip(jobs, firsts)))
        finally:
            self._inflight -= 1
            for job in jobs:
                await job.close()
        choices = [c.final_choice(kind, req) for job in jobs for c in job.returned()]
        return Reply(response_body(kind, rid, req, choices, usage_of(jobs)), None, jobs)

    def _stream_ended(self) -> None:
        self._inflight -= 1
