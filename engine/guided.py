"""Structured output: a grammar (llguidance's format: JSON schema, regex, Lark) applied as
a token mask in the sampler. llguidance is imported lazily, when a request first asks.

The matcher of a request is rebuilt from its generated ids wherever the request is
sampled: a prefill worker masks the first token, the decode worker replays that token
into its own matcher and masks the rest."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


# JSON as json.dumps writes it (", " and ": ", no other whitespace): small models given
# free whitespace tend to fill their budget with it. A schema's "x-guidance" overrides.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_for(kind: str, value: Any) -> str:
    """llguidance grammar of a structured-output request: kind json_schema (value: a
    schema dict or string), json_object (any JSON object), regex, choice (a list of
    strings), lark. Raises ValueError on a malformed value (not on grammar errors; see
    check_grammar)."""
    from llguidance import LLMatcher

    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)
    if kind == "json_schema":
        schema = value if isinstance(value, (str, dict)) else json.dumps(value)
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(str(value))
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("choice takes a non-empty list of non-empty strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if kind == "lark":
        return LLMatcher.grammar_from_lark(str(value))
    raise ValueError(f"unknown grammar kind {kind!r}")


class GrammarTokenizer:
    """llguidance's view of a model's tokenizer (built once per process and model)."""

    def __init__(self, model_dir: str | Path) -> None:
        from llguidance import LLTokenizer

        from engine.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
        self.eos = list(tok.eos_token_ids)
        self.ll = LLTokenizer(tok.tk.to_str(), n_vocab=tok.vocab_size, eos_token=self.eos)

    def check(self, grammar: str) -> str:
        """'' when the grammar compiles for this tokenizer, else the error."""
        from llguidance import LLMatcher

        return str(LLMatcher.validate_grammar(grammar, self.ll))


class Guide:
    """One request's matcher and the number of its generated tokens it has consumed."""

    def __init__(self, gtok: GrammarTokenizer, grammar: str) -> None:
        from llguidance import LLMatcher

        self.gtok = gtok
        self.matcher = LLMatcher(gtok.ll, grammar, log_level=0)
        self.consumed = 0
        if self.matcher.is_error():
            raise ValueError(f"grammar does not compile: {self.matcher.get_error()}")

    def catch_up(self, output_token_ids: list[int]) -> None:
        for t in output_token_ids[self.consumed:]:
            if not self.matcher.consume_token(t):
                logger.warning("token %d rejected by the grammar: %s", t, self.matcher.get_error())
            self.consumed += 1

    def allowed(self, vocab: int) -> torch.Tensor:
        """Bool [vocab]: tokens the grammar allows next (EOS once it is complete)."""
        out = torch.zeros(vocab, dtype=torch.bool)
        if self.matcher.is_error():
            out[self.gtok.eos] = True  # end the sequence rather than go on unconstrained
            return out
        bias = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        n = min(vocab, bias.numel())
        out[:n] = bias[:n] > 0
        return out
