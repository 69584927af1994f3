"""What TTFT admission predicts from: time to first token as a function of the prompt
tokens queued ahead of a request (its own included), fitted online.

TTFT is a fixed part (dispatch, the Ray calls, the first token's sampling and hand-off)
plus a part that grows with the tokens to prefill first: ``ttft ~ a + b * tokens``. A
ratio ``ttft / tokens`` (what a single rate would be) charges the fixed part to every
token, so for short prompts it predicts several times the real TTFT of a longer queue,
and admission refuses requests the pool would have served in time. This fits both parts
by least squares over exponentially decayed samples (recent load counts most), with
``a, b >= 0``; while the samples do not spread over queue lengths the fit cannot tell
``a`` from ``b`` and predicts the mean TTFT scaled by the queue (the ratio, at the lengths
seen so far it is the mean).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass
class TTFTModel:
    decay: float = 0.9  # weight of the past at each new sample
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    samples: int = 0

    def observe(self, tokens: float, ttft_s: float) -> None:
        d = self.decay
        self.w = d * self.w + 1.0
        self.sx = d * self.sx + tokens
        self.sy = d * self.sy + ttft_s
        self.sxx = d * self.sxx + tokens * tokens
        self.sxy = d * self.sxy + tokens * ttft_s
        self.samples += 1

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds a, seconds per queued token b), both >= 0."""
        if self.w == 0 or self.sx <= 0:
            return 0.0, 0.0
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > (0.1 * mx) ** 2:
            b = (self.sxy / self.w - mx * my) / var
            a = my - b * mx
            if a >= 0 and b >= 0:
                return a, b
            if b < 0:  # more tokens, no slower: noise; the mean is the best guess
                return my, 0.0
        return 0.0, my / mx  # no spread (or a < 0): the ratio through the origin

    def predict(self, tokens: float) -> float:
        a, b = self.coefficients()
        return a + b * tokens


def queue_refusal(predicted_s: float | None, slo_ttft_ms: float, a: float, b: float,
                  short_tokens: int) -> tuple[str, int] | None:
    """The 429 for a request refused before its body is parsed: the first-token worker's
    queue plus a short prompt (the shortest of the recent requests', ``short_tokens``; the
    request's own is not known before tokenizing) already predicts a TTFT over the target.
    Only a prompt shorter than every recent one could be refused here that the exact
    check would admit. (message, Retry-After seconds), or None to go on (parse, tokenize,
    then the exact check with its own prompt)."""
    slo = slo_ttft_ms / 1000.0
    if predicted_s is None or predicted_s <= slo:
        return None
    retry = min(60, max(1, math.ceil(predicted_s - slo)))
    return (f"predicted time to first token {predicted_s * 1e3:.0f} ms exceeds the {slo_ttft_ms:.0f} ms "
            f"target with the queue and a prompt of {short_tokens} tokens, the shortest of late (measured "
            f"{a * 1e3:.0f} ms + {b * 1e3:.3f} ms per prompt token queued ahead); refused before "
            f"parsing the request; retry in {retry} s"), retry


class RecentPrompts:
    """Prompt lengths (tokens) of the last ``keep`` requests parsed; ``short()`` is the
    shortest (1 before any), what an unparsed request is assumed to need at least."""

    def __init__(self, keep: int = 32) -> None:
        self.lengths: deque[int] = deque(maxlen=keep)

    def observe(self, tokens: int) -> None:
        self.lengths.append(tokens)

    def short(self) -> int:
        return max(1, min(self.lengths, default=1))


class Headroom:
    """What the TTFT model does not see, learned: the model predicts the time from a request
    joining a worker's queue to its first token, and is accurate at that (measured in a
    300-request burst: within 10 ms for every admitted request), but the client also waits
    for the ingress before the queue (reading, parsing, tokenizing its request while the
    loop answers the burst's refusals) and after (the first chunk's write). Each first token
    adds a residual, (first token - arrival at the ingress) - the prediction made at
    admission; the margin is the SLO's attainment quantile of the recent residuals, so that
    admission holds the share of requests the SLO asks for (``slo.attainment``), not the
    mean, to the target. Zero until ``min_samples`` residuals exist; never negative."""

    def __init__(self, quantile: float, keep: int = 64, min_samples: int = 8) -> None:
        self.quantile = quantile
        self.min_samples = min_samples
        self.residuals: deque[float] = deque(maxlen=keep)
        self._margin = 0.0

    def observe(self, residual_s: float) -> None:
        self.residuals.append(residual_s)
        if len(self.residuals) >= self.min_samples:
            xs = sorted(self.residuals)
            self._margin = max(0.0, xs[min(len(xs) - 1, int(self.quantile * len(xs)))])

    def margin(self) -> float:
        return self._margin


class Unadmitted:
    """Requests that passed the early check and are not yet admitted or refused (their bodies
    are being read, parsed, tokenized). Under a burst every arrival passes the early check
    before any is admitted: reading a body, FastAPI's routing and validation yield to the
    loop, so without counting these the early check sees an empty queue for the whole burst
    and lets ~100 of 300 requests through to be parsed and tokenized, only to refuse them
    after (measured: 86-141 late refusals per 300-request burst, ~0.5 ms of tokenization
    each on the ingress's loop, delaying the admitted requests' first tokens). Each counts
    as the shortest recent prompt queued ahead of later arrivals."""

    def __init__(self) -> None:
        self.count = 0

    def ticket(self) -> Ticket:
        self.count += 1
        return Ticket(self)


class Ticket:
    """One request's place among the unadmitted; ``release`` (idempotent) at its exact
    admission check, or when the request ends before reaching it."""

    __slots__ = ("_owner",)

    def __init__(self, owner: Unadmitted) -> None:
        self._owner: Unadmitted | None = owner

    def release(self) -> None:
        if self._owner is not None:
            self._owner.count -= 1
            self._owner = None
