"""Structured output in the engine: sampled outputs under a JSON-schema / regex / choice
grammar always match it, and a request split over a prefill engine (first token masked
there) and a decode engine (matcher rebuilt from the generated ids) equals one engine."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine.engine import LLMEngine
from engine.guided import grammar_for
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir():
    return builtin_model_dir("tiny-llama")


def engine(d, prefill_only=False):
    return LLMEngine.from_model_dir(d, num_blocks=256, block_size=8,
                                    scheduler_config=SchedulerConfig(max_num_batched_tokens=256,
                                                                     max_model_len=1024,
                                                                     prefill_only=prefill_only))


def texts(d, eng, params_list, prompt):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(d)
    seqs = [eng.add_request(f"r{i}", prompt, p) for i, p in enumerate(params_list)]
    while eng.has_work:
        eng.step()
    return [(tok.decode(s.output_token_ids), s.finish_reason) for s in seqs]


def test_json_schema_outputs_always_validate(model_dir):
    g = grammar_for("json_schema", SCHEMA)
    ps = [SamplingParams(temperature=1.0, seed=s, max_tokens=120, grammar=g) for s in range(12)]
    for text, reason in texts(model_dir, engine(model_dir), ps, [1, 986, 884]):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_regex_choice(model_dir):
    eng = engine(model_dir)
    obj = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, grammar=grammar_for("json_object", None))
           for s in range(4)]
    # The tiny model never closes its strings on its own; every output the grammar ended
    # parses, the others were cut by max_tokens.
    for text, reason in texts(model_dir, eng, obj, [1, 986, 884]):
        assert text.startswith("{") and reason in ("stop", "length")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
    rx = r"[a-z]{3,6}-\d{2}"
    for text, reason in texts(model_dir, eng, [SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                                                              grammar=grammar_for("regex", rx))
                                               for s in range(8)], [1, 986]):
        assert reason == "stop" and re.fullmatch(rx, text), text
    choices = ["yes", "no", "maybe so"]
    got = texts(model_dir, eng, [SamplingParams(temperature=1.0, seed=s, max_tokens=20,
                                                grammar=grammar_for("choice", choices)) for s in range(8)], [1, 5])
    assert all(t in choices and r == "stop" for t, r in got), got


def test_split_prefill_decode_equals_one_engine(model_dir):
    p = [1, 986, 884, 33]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=120, grammar=grammar_for("json_schema", SCHEMA))
    whole = engine(model_dir)
    seq = whole.add_request("r", p, params)
    while whole.has_work:
        whole.step()
    pre = engine(model_dir, prefill_only=True)
    pre.add_request("r", p, params)
    kv = first = None
    while pre.has_work:
        out = pre.step()
        kv = out.exported_kv.get("r", kv)
        first = out.new_tokens.get("r", first)
    dec = engine(model_dir)
    split = dec.add_request("r", p, params, output_token_ids=[first], pending_kv=kv)
    while dec.has_work:
        dec.step()
    assert split.output_token_ids == seq.output_token_ids
    assert not dec.sampler._guides  # matchers are dropped with their requests
