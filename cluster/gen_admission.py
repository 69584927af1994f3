"""The generator's TTFT admission: predict a new request's time to first token from the
first-token pool's queue (cluster/admission.py's model and headroom), refuse (429) what
would miss the target, count admitted prompts as queued until they reach a worker, and
learn from every first token."""

from __future__ import annotations

import math
import time
from typing import Any

from cluster.admission import Headroom, TTFTModel
from cluster.errors import OverloadedError
from cluster.genrequest import GenRequest, Queued
from cluster.router import WorkerView

# Samples of the prefill rate before predictions are trusted.
ADMIT_MIN_SAMPLES = 3


class AdmissionMixin:
    """Generator's admission; the generator sets these in its __init__."""

    m: Any
    router: Any
    metrics: Any
    first_pool: str
    ttft_model: TTFTModel
    headroom: Headroom
    reserved: int
    refused_requests: int
    refused_prompt_tokens: int

    def predict_ttft(self, prompt_tokens: int, unadmitted_tokens: int = 0) -> float | None:
        """Seconds to the first token of a new request of prompt_tokens at the least-loaded
        first-token worker, behind its queue, the admitted requests not yet queued and
        unadmitted_tokens (requests not yet parsed, assumed ahead); None while the rate is
        unmeasured or nothing is ahead (a request with nothing ahead of it is always
        admitted)."""
        if self.ttft_model.samples < ADMIT_MIN_SAMPLES:
            return None
        ws = self.router.healthy(self.first_pool)
        if not ws:
            return None
        ahead = min(w.queued_tokens for w in ws) + (self.reserved + unadmitted_tokens) // len(ws)
        if ahead == 0:
            return None
        return self.ttft_model.predict(ahead + prompt_tokens) + self.headroom.margin()

    def _expect(self, reqs: list[GenRequest], predicted: float | None) -> None:
        """Remember the TTFT admission expects of each request (for Headroom): the model's
        prediction without the margin, or with nothing ahead, the model's for its prompt
        alone."""
        if predicted is None and self.ttft_model.samples >= ADMIT_MIN_SAMPLES:
            predicted = self.ttft_model.predict(sum(len(r.prompt_token_ids) for r in reqs))
        elif predicted is not None:
            predicted -= self.headroom.margin()
        for r in reqs:
            r.predicted_ttft = predicted

    def admit(self, reqs: list[GenRequest]) -> None:
        """Raise OverloadedError (429, Retry-After) if the requests (one HTTP request's
        prompts) would miss their TTFT target behind the queue: early, instead of queueing
        without bound. Admitted, their prompt tokens count as queued at once."""
        if not self.m.server.ttft_admission:
            return
        prompt_tokens = sum(len(r.prompt_token_ids) for r in reqs)
        predicted = self.predict_ttft(prompt_tokens)
        slo = self.m.slo.ttft_ms / 1000.0
        if predicted is None or predicted <= slo:
            self._expect(reqs, predicted)
            for r in reqs:
                r.reserved = len(r.prompt_token_ids)
                self.reserved += r.reserved
            return
        self.metrics.rejected.labels("ttft").inc()
        self.refused_requests += len(reqs)
        self.refused_prompt_tokens += prompt_tokens
        retry = min(60, max(1, math.ceil(predicted - slo)))
        a, b = self.ttft_model.coefficients()
        raise OverloadedError(f"predicted time to first token {predicted * 1e3:.0f} ms exceeds the "
                              f"{self.m.slo.ttft_ms:.0f} ms target (measured {a * 1e3:.0f} ms + "
                              f"{b * 1e3:.3f} ms per prompt token queued ahead); retry in {retry} s", retry)

    def release(self, req: GenRequest) -> None:
        """Forget what admission counted for req (idempotent)."""
        self._unreserve(req)

    def _unreserve(self, req: GenRequest) -> None:
        self.reserved -= req.reserved
        req.reserved = 0

    def _queue(self, w: WorkerView, tokens: int, req: GenRequest) -> Queued:
        """A request's prompt joins w's queue: (worker, its tokens, tokens ahead incl. its
        own, when, the request)."""
        self._unreserve(req)
        ahead = w.queued_tokens + tokens
        w.queued_tokens += tokens
        return w, tokens, ahead, time.monotonic(), req

    def _dequeue(self, q: Queued | None, first_token: bool) -> None:
        if q is None:
            return
        w, tokens, ahead, t, req = q
        w.queued_tokens -= tokens
        if first_token and ahead > 0:
            now = time.monotonic()
            self.ttft_model.observe(ahead, now - t)
            if req.predicted_ttft is not None:
                self.headroom.observe(now - (req.arrived_at or t) - req.predicted_ttft)
                req.predicted_ttft = None  # once per request (a resumed one comes back here)
