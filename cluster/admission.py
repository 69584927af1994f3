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
