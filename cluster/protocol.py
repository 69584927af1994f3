"""OpenAI request bodies, validated at the edge: every problem is a 400 naming the field
and what is allowed. Unknown fields are ignored (clients send many); fields we do not
support are rejected when set to anything but their neutral value."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.errors import InvalidRequestError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    user: str | None = None
    # Extension: add the generated token ids to each choice (exactness tests, tooling).
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if len(items) > 8 or any(not s for s in items):
            raise ValueError("stop takes up to 8 non-empty strings")
        return items

    def check_supported(self) -> None:
        if self.n != 1:
            raise InvalidRequestError(f"n={self.n} is not supported; allowed: 1", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported; allowed: 0", param=name)
        if self.logprobs not in (None, False, 0):
            raise InvalidRequestError("logprobs are not supported; omit the field", param="logprobs")


class CompletionRequest(CommonParams):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("echo is not supported; allowed: false", param="echo")
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of is not supported; allowed: 1", param="best_of")

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
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

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
    max_completion_tokens: int | None = Field(None, ge=1)


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
        msg = f"{loc}: {err['msg']}"
        if err["type"] != "missing":
            got = repr(err.get("input"))
            msg += f", got {got if len(got) <= 60 else got[:57] + '...'}"
        raise InvalidRequestError(msg, param=loc) from None
    req.check_supported()
    return req
