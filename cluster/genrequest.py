"""What one request is on its way through the pools, and what comes back: the request
(prompt ids, sampling parameters, what admission counted for it), its text deltas, its
usage, and the stop-string matcher. Shared by the generator, its admission and the
ingress; imports none of them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.router import WorkerView
from engine.sequence import SamplingParams


@dataclass
class GenRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:16]}")
    # Params of further choices of the same prompt (n > 1): one prefill, forked KV.
    more: list[SamplingParams] = field(default_factory=list)
    # Prompt tokens admission counted as queued before the request reached a worker.
    reserved: int = 0
    # When the ingress first saw the request (time.monotonic(); 0: unknown) and the time to
    # first token admission predicted for it (None: not predicted): what Headroom learns from.
    arrived_at: float = 0.0
    predicted_ttft: float | None = None


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    # Per token of token_ids, when the request asked (params.logprobs): (logprob, top ids,
    # top logprobs) of the raw logits.
    logprobs: list[Any] | None = None
    # On the first delta when the request asked (params.prompt_logprobs): one entry per
    # prompt token, None for the first.
    prompt_logprobs: list[Any] | None = None
    # Which of the request's choices (0 .. len(GenRequest.more)).
    index: int = 0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Seconds the prefill worker spent on the request (queue + compute), as it reports.
    worker_s: float = 0.0
    # Monotonic times: request handed to a worker, first token back from it.
    dispatched_at: float = 0.0
    first_token_at: float = 0.0
    # The prefill call's parts beyond the worker's own time (seconds): the call's way in
    # (submission to the worker's method starting), publishing the KV after the engine
    # finished, and the reply's way back.
    rpc_in_s: float = 0.0
    publish_s: float = 0.0
    rpc_out_s: float = 0.0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class StopStrings:
    """Holds back text that could be the start of a stop string; cuts at a full match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.floor = 0  # matches start at or after this (text before min_tokens is exempt)

    def feed(self, new: str, final: bool, active: bool = True) -> tuple[str, bool]:
        """Returns (text safe to send now, whether a stop string matched). With active
        false (fewer than min_tokens generated), the text passes unchecked."""
        self.text += new
        if not active:
            out, self.sent = self.text[self.sent:], len(self.text)
            self.floor = self.sent
            return out, False
        if self.stops:
            start = max(self.floor, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                cut = min(hits)
                out, self.sent = self.text[self.sent:cut], cut
                return out, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self._partial())
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def _partial(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best


# A request's place in a worker's queue (Generator._queue): (worker, its prompt tokens,
# tokens ahead incl. its own, when it joined, the request).
Queued = tuple[WorkerView, int, int, float, GenRequest]
