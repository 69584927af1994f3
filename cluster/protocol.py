"""OpenAI request bodies, validated at the edge: every problem is a 400 naming the field
and what is allowed. Nothing is silently ignored: a field that is not declared here is
refused (400 naming it), and a declared field is either honoured or refused when set to
anything but its neutral value (tests/integration/test_request_fields.py walks them all)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.errors import InvalidRequestError


MAX_LOGPROBS = 20
MAX_CHOICES = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # Names the schema; no effect on the output (as in OpenAI's API).
    name: str = Field(min_length=1, max_length=64)
    # OpenAI may show it to the model; this server does not: refused when set.
    description: str | None = None
    # "schema" shadows a BaseModel attribute: stored as schema_.
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    # Output always matches the schema here (it is a grammar mask), strict or not.
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only for type json_schema, not {self.type}")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # JSON schema of the arguments.
    parameters: dict[str, Any] | None = None
    # Calls forced by tool_choice match the schema always (a grammar); auto calls are
    # read as the model writes them, strict or not.
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ChosenFunction


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Choices per prompt; they share one prefill (forked KV) and choice j samples with
    # seed + j.
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM extensions: HF repetition penalty, tokens before EOS/stop ids may end the output.
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    # Token id (a string in JSON) -> bias added to its logit, -100..100.
    logit_bias: dict[str, float] | None = None
    # An end-user id (OpenAI: for abuse monitoring); has no effect on the output by definition.
    user: str | None = None
    # Extension: add the generated token ids to each choice (exactness tests, tooling).
    return_token_ids: bool = False
    # Structured output: {"type": "text" | "json_object" | "json_schema", "json_schema":
    # {"name", "schema", "strict"}}; vLLM's guided_* extensions (at most one of all these).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # Lark (llguidance's dialect)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if len(items) > 8 or any(not s for s in items):
            raise ValueError("stop takes up to 8 non-empty strings")
        return items

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids, found {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias of token {key} is {bias}; allowed: -100..100")
        return v

    def check_supported(self) -> None:
        rf = self.response_format
        if rf is not None and rf.json_schema is not None and rf.json_schema.description is not None:
            raise InvalidRequestError("response_format.json_schema.description is not shown to the model "
                                      "by this server; omit it", param="response_format.json_schema.description")
        guided = [name for name, _, _ in [self.structured()] if name] + [
            n for n in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
            if getattr(self, n) is not None]
        if len(set(guided)) > 1:
            raise InvalidRequestError(f"{' and '.join(sorted(set(guided)))} both constrain the output; "
                                      "set one", param=sorted(set(guided))[-1])
        if guided and self.ignore_eos:
            raise InvalidRequestError(f"ignore_eos cannot be combined with {guided[0]} (the output ends "
                                      "where the grammar does)", param="ignore_eos")

    def structured(self) -> tuple[str | None, str | None, Any]:
        """(field, grammar kind, value) of the structured-output request, or Nones."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return "response_format", "json_object", None
        if rf is not None and rf.type == "json_schema":
            assert rf.json_schema is not None
            return "response_format", "json_schema", rf.json_schema.schema_
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"),
                           ("guided_choice", "choice"), ("guided_grammar", "lark")):
            if getattr(self, name) is not None:
                return name, kind, getattr(self, name)
        return None, None, None

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(top logprobs per generated token or None, per prompt token or None)."""
        raise NotImplementedError


class CompletionRequest(CommonParams):
    prompt: str | list[int] | list[str] | list[list[int]]
    # Top logprobs per token (0: the chosen token's only), with the chosen token's own.
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    # Choices generated per prompt, of which the n with the highest cumulative logprob
    # are returned.
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequestError(f"best_of={self.best_of} must be >= n={self.n}", param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise InvalidRequestError("best_of > n cannot be streamed (the best are known at the "
                                      "end); set stream false", param="best_of")
        if self.suffix:
            raise InvalidRequestError("suffix (insertion) is not supported; omit it", param="suffix")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, (self.logprobs if self.echo and self.logprobs is not None else None)

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or a list (each its own choice)."""
        p = self.prompt
        items = list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        for item in items:
            if not item:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
        return items  # type: ignore[return-value]

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidRequestError(f"one prompt per request is supported, got {len(p)}",
                                          param="prompt")
            p = p[0]
        if not p:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return p  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    # An assistant turn's tool calls, and a tool turn's answer to one (rendered by the
    # chat template of a tool-capable model).
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls is not None:
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise InvalidRequestError(f"content part type {part.get('type')!r} is not "
                                              "supported; allowed: text", param="messages")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(CommonParams):
    messages: list[ChatMessage] = Field(min_length=1)
    # Tools (chat, models whose chat template renders them; cluster/tools.py).
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.tool_choice is not None and not self.tools:
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        if self.parallel_tool_calls is not None and not self.tools:
            raise InvalidRequestError("parallel_tool_calls needs tools", param="parallel_tool_calls")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise InvalidRequestError(f"tool_choice names {self.tool_choice.function.name!r}; tools "
                                          f"offer {names}", param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return ((self.top_logprobs or 0) if self.logprobs else None), None


def parse_json_request(model_cls: type[CommonParams], raw: bytes) -> Any:
    """parse_request of a raw JSON body, parsed and validated in one pass (pydantic's JSON
    parser validates as it parses: ~40% less work than json.loads + model_validate). Only
    a body that pass accepts takes it (what it accepts, json.loads + strict validation
    accepts with the same values: tests/unit/test_protocol.py); any other goes through
    json.loads and parse_request, so that every error (invalid JSON, a body that is not
    an object, each field's message) is exactly what it was."""
    try:
        req = model_cls.model_validate_json(raw, strict=True)
    except ValidationError:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
        return parse_request(model_cls, body)
    req.check_supported()
    return req


def parse_request(model_cls: type[CommonParams], body: object) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, found {type(body).__name__}")
    try:
        # Strict, as OpenAI's API is: "stream": "yes", "max_tokens": "5" or 5.0 are 400s,
        # not coerced (an int is still a valid float).
        req = model_cls.model_validate(body, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise InvalidRequestError(
                f"{loc}: unknown field; this server does not implement it (nothing is ignored "
                "silently)", param=loc) from None
        msg = f"{loc}: {err['msg']}"
        if err["type"] != "missing":
            got = repr(err.get("input"))
            msg += f", got {got if len(got) <= 60 else got[:57] + '...'}"
        raise InvalidRequestError(msg, param=loc) from None
    req.check_supported()
    return req
