"""Nothing is silently ignored: this test walks every field of the request models
(completions, chat, chat messages, stream options) and proves, over real HTTP, that each
is either honoured (a behavioural check shows its effect) or refused with a 400 naming
it. A field added to a model without an entry here fails the walk. Unknown fields are
refused too."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import pytest

import jsonschema

from cluster.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, JsonSchemaFormat,
                              ResponseFormat, StreamOptions)

from .conftest import manifest_for, serving

EOS = 2  # the built-in tiny model's EOS id


@pytest.fixture(scope="module")
def url(ray_session, llama_dir):
    with serving(manifest_for(llama_dir)) as (u, _dep):
        yield u


def base(kind: str) -> dict:
    if kind == "completion":
        return {"model": "tiny", "prompt": "import os", "max_tokens": 8, "temperature": 0,
                "return_token_ids": True}
    return {"model": "tiny", "messages": [{"role": "user", "content": "import os"}], "max_tokens": 8,
            "temperature": 0, "return_token_ids": True}


def post(url: str, kind: str, **fields) -> httpx.Response:
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    return httpx.post(f"{url}{path}", json={**base(kind), **fields}, timeout=60)


def ok(url: str, kind: str, **fields) -> dict:
    r = post(url, kind, **fields)
    assert r.status_code == 200, r.text
    return r.json()


def ids(url, kind, **fields) -> list[int]:
    return ok(url, kind, **fields)["choices"][0]["token_ids"]


def text(url, kind, **fields) -> str:
    c = ok(url, kind, **fields)["choices"][0]
    return c["text"] if kind == "completion" else c["message"]["content"]


def sse(url, kind, **fields) -> list[dict]:
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    with httpx.stream("POST", f"{url}{path}", json={**base(kind), "stream": True, **fields}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# -- effects, one per field (kind -> asserts the field changes what it should) -----------
def e_model(u, k):
    r = post(u, k, model="not-served")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def e_prompt(u, k):
    a, b = ok(u, k), ok(u, k, prompt="class Foo(object):")
    assert a["usage"]["prompt_tokens"] != b["usage"]["prompt_tokens"]
    assert a["choices"][0]["token_ids"] != b["choices"][0]["token_ids"]


def e_messages(u, k):
    a = ok(u, k)
    b = ok(u, k, messages=[{"role": "user", "content": "class Foo(object):"}])
    assert a["usage"]["prompt_tokens"] != b["usage"]["prompt_tokens"]


def e_role(u, k):
    a = ok(u, k, messages=[{"role": "user", "content": "x"}])
    b = ok(u, k, messages=[{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"},
                           {"role": "user", "content": "x"}])
    assert a["usage"]["prompt_tokens"] < b["usage"]["prompt_tokens"]


def e_content(u, k):
    a = ok(u, k, messages=[{"role": "user", "content": "x"}])
    b = ok(u, k, messages=[{"role": "user", "content": [{"type": "text", "text": "x y z w"}]}])
    assert a["usage"]["prompt_tokens"] < b["usage"]["prompt_tokens"]


def e_max_tokens(u, k, name="max_tokens"):
    for n in (3, 5):
        body = ok(u, k, ignore_eos=True, **{name: n})
        assert body["usage"]["completion_tokens"] == n


def e_max_completion_tokens(u, k):
    fields = dict(base(k))
    del fields["max_tokens"]
    r = httpx.post(f"{u}/v1/chat/completions", json={**fields, "max_completion_tokens": 4, "ignore_eos": True},
                   timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 4


def e_temperature(u, k):
    greedy = ids(u, k)
    assert any(ids(u, k, temperature=1.5, seed=s) != greedy for s in range(3))


def e_top_p(u, k):
    greedy = ids(u, k)
    assert ids(u, k, temperature=1.0, top_p=1e-6, seed=5) == greedy
    assert any(ids(u, k, temperature=1.0, top_p=1.0, seed=s) != greedy for s in range(3))


def e_top_k(u, k):
    greedy = ids(u, k)
    assert ids(u, k, temperature=1.0, top_k=1, seed=5) == greedy
    assert any(ids(u, k, temperature=1.0, top_k=50, seed=s) != greedy for s in range(3))


def e_seed(u, k):
    a = ids(u, k, temperature=1.0, seed=7)
    assert ids(u, k, temperature=1.0, seed=7) == a
    assert any(ids(u, k, temperature=1.0, seed=s) != a for s in (8, 9, 10))


def e_stop(u, k):
    full = text(u, k, ignore_eos=True, max_tokens=16)
    stop = full[4:7]
    assert len(full) > 8
    assert text(u, k, ignore_eos=True, max_tokens=16, stop=[stop]) == full[: full.index(stop)]


def e_stop_token_ids(u, k):
    first = ids(u, k)[0]
    body = ok(u, k, stop_token_ids=[first], ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["finish_reason"] == "stop"


def e_ignore_eos(u, k):
    bias = {str(EOS): 100}
    assert ok(u, k, logit_bias=bias)["usage"]["completion_tokens"] == 1
    assert ok(u, k, logit_bias=bias, ignore_eos=True)["usage"]["completion_tokens"] == 8


def e_stream(u, k):
    chunks = sse(u, k, ignore_eos=True)
    got = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
    assert got == ids(u, k, ignore_eos=True)


def e_stream_options(u, k):
    chunks = sse(u, k, stream_options={"include_usage": True})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all("usage" not in c for c in sse(u, k))


def _differs(u, k, **fields):
    # A prompt whose greedy continuation repeats tokens (the tiny model's is checked with
    # transformers to change under each penalty at 2.0), so penalties have something to bite.
    text = "def f(x):\n    return"
    prompt = {"prompt": text} if k == "completion" else {"messages": [{"role": "user", "content": text}]}
    plain = ids(u, k, ignore_eos=True, max_tokens=24, **prompt)
    assert ids(u, k, ignore_eos=True, max_tokens=24, **prompt, **fields) != plain


def e_presence_penalty(u, k):
    _differs(u, k, presence_penalty=2.0)


def e_frequency_penalty(u, k):
    _differs(u, k, frequency_penalty=2.0)


def e_repetition_penalty(u, k):
    _differs(u, k, repetition_penalty=2.0)


def e_logit_bias(u, k):
    assert set(ids(u, k, logit_bias={"300": 100}, ignore_eos=True)) == {300}


def e_min_tokens(u, k):
    body = ok(u, k, logit_bias={str(EOS): 100}, min_tokens=4)
    assert body["usage"]["completion_tokens"] == 5


def e_logprobs(u, k):
    assert ok(u, k)["choices"][0]["logprobs"] is None
    lp = ok(u, k, logprobs=2 if k == "completion" else True)["choices"][0]["logprobs"]
    if k == "completion":
        assert len(lp["token_logprobs"]) == 8 and all(len(t) in (2, 3) for t in lp["top_logprobs"])
    else:
        assert len(lp["content"]) == 8 and all(c["top_logprobs"] == [] for c in lp["content"])


def e_top_logprobs(u, k):
    lp = ok(u, k, logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]
    assert all(len(c["top_logprobs"]) == 3 for c in lp["content"])


def e_echo(u, k):
    plain = text(u, k)
    assert text(u, k, echo=True) == "import os" + plain


def e_n(u, k):
    r = ok(u, k, n=3, temperature=1.0, seed=2)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert len({tuple(c["token_ids"]) for c in r["choices"]}) == 3


def e_best_of(u, k):
    r = ok(u, k, n=1, best_of=3, temperature=1.0, seed=2, logprobs=0)
    cums = [sum(ok(u, k, temperature=1.0, seed=2 + j, logprobs=0)["choices"][0]["logprobs"]["token_logprobs"])
            for j in range(3)]
    assert len(r["choices"]) == 1
    assert abs(sum(r["choices"][0]["logprobs"]["token_logprobs"]) - max(cums)) < 1e-3


def e_user(u, k):
    # OpenAI: an end-user id for abuse monitoring; by definition it changes nothing.
    assert ok(u, k, user="alice")["choices"][0]["token_ids"] == ids(u, k)


def e_return_token_ids(u, k):
    r = post(u, k, return_token_ids=False).json()
    assert "token_ids" not in r["choices"][0] and len(ok(u, k)["choices"][0]["token_ids"]) == 8


def e_include_usage(u, k):
    e_stream_options(u, k)


SCHEMA = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}, "n": {"type": "integer", "maximum": 9}},
          "required": ["k", "n"], "additionalProperties": False}


def _schema_format(**kw):
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, **kw}}


def e_response_format(u, k):
    jsonschema.validate(json.loads(text(u, k, max_tokens=40, response_format=_schema_format())), SCHEMA)
    assert text(u, k, max_tokens=40, response_format={"type": "json_object"}).startswith("{")


def e_rf_type(u, k):
    plain = text(u, k, max_tokens=40, response_format={"type": "text"})
    assert plain == text(u, k, max_tokens=40) and not plain.startswith("{")
    e_response_format(u, k)


def e_rf_json_schema(u, k):
    e_response_format(u, k)


def e_schema(u, k):
    other = {"type": "object", "properties": {"z": {"const": 5}}, "required": ["z"], "additionalProperties": False}
    out = text(u, k, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": other}})
    assert json.loads(out) == {"z": 5}


def e_schema_name(u, k):
    # Names the schema; by definition it changes nothing.
    a = text(u, k, max_tokens=40, temperature=1.0, seed=4, response_format=_schema_format())
    schema = {"type": "json_schema", "json_schema": {"name": "other_name", "schema": SCHEMA}}
    assert text(u, k, max_tokens=40, temperature=1.0, seed=4, response_format=schema) == a


def e_schema_strict(u, k):
    # Both ways the output matches (a grammar mask is strict by construction).
    for strict in (True, False):
        jsonschema.validate(json.loads(text(u, k, max_tokens=40, response_format=_schema_format(strict=strict))),
                            SCHEMA)


def e_guided_json(u, k):
    jsonschema.validate(json.loads(text(u, k, max_tokens=40, guided_json=SCHEMA)), SCHEMA)


def e_guided_regex(u, k):
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text(u, k, max_tokens=20, guided_regex=r"[0-9]{3}-[a-z]{2}"))


def e_guided_choice(u, k):
    assert text(u, k, max_tokens=20, guided_choice=["alpha", "beta"]) in ("alpha", "beta")


def e_guided_grammar(u, k):
    assert re.fullmatch(r"(ab)+c", text(u, k, max_tokens=20, guided_grammar='start: ("a" "b")+ "c"'))


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _refused_naming_model(r, param):
    # The served model's chat template has no tools: refused, naming the model (a
    # tool-capable template is tested in tests/integration/test_tools_api.py).
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "'tiny'" in err["message"] and "tools" in err["message"], err


def e_tools(u, k):
    _refused_naming_model(post(u, k, tools=[TOOL]), "tools")
    r = post(u, k, tools=[TOOL], tool_choice="required")
    _refused_naming_model(r, "tools")


def e_tool_choice(u, k):
    r = post(u, k, tool_choice="auto")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    _refused_naming_model(post(u, k, tools=[TOOL], tool_choice="auto"), "tools")


def e_parallel_tool_calls(u, k):
    r = post(u, k, parallel_tool_calls=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls"
    _refused_naming_model(post(u, k, tools=[TOOL], parallel_tool_calls=False), "tools")


def e_message_tool_calls(u, k):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    _refused_naming_model(post(u, k, messages=[{"role": "user", "content": "x"},
                                               {"role": "assistant", "tool_calls": [call]}]), "messages")


def e_message_tool_call_id(u, k):
    _refused_naming_model(post(u, k, messages=[{"role": "user", "content": "x"},
                                               {"role": "tool", "tool_call_id": "c1", "content": "4"}]), "messages")


def refused(value) -> tuple[str, object]:
    return ("refused", value)


# field -> an effect check, or ("refused", a value that must be refused with 400 naming it)
COMMON: dict[str, Callable | tuple[str, object]] = {
    "model": e_model, "max_tokens": e_max_tokens, "temperature": e_temperature, "top_p": e_top_p,
    "top_k": e_top_k, "seed": e_seed, "stop": e_stop, "stop_token_ids": e_stop_token_ids,
    "ignore_eos": e_ignore_eos, "stream": e_stream, "stream_options": e_stream_options,
    "n": e_n, "presence_penalty": e_presence_penalty, "frequency_penalty": e_frequency_penalty,
    "repetition_penalty": e_repetition_penalty, "min_tokens": e_min_tokens, "logit_bias": e_logit_bias,
    "user": e_user, "return_token_ids": e_return_token_ids,
    "response_format": e_response_format, "guided_json": e_guided_json, "guided_regex": e_guided_regex,
    "guided_choice": e_guided_choice, "guided_grammar": e_guided_grammar,
}
FIELDS = {
    "completion": {**COMMON, "prompt": e_prompt, "logprobs": e_logprobs, "echo": e_echo,
                   "best_of": e_best_of, "suffix": refused("x")},
    "chat": {**COMMON, "messages": e_messages, "max_completion_tokens": e_max_completion_tokens,
             "logprobs": e_logprobs, "top_logprobs": e_top_logprobs, "tools": e_tools,
             "tool_choice": e_tool_choice, "parallel_tool_calls": e_parallel_tool_calls},
    "message": {"role": e_role, "content": e_content, "tool_calls": e_message_tool_calls,
                "tool_call_id": e_message_tool_call_id},
    "stream_options": {"include_usage": e_include_usage},
    "response_format": {"type": e_rf_type, "json_schema": e_rf_json_schema},
    "json_schema": {"name": e_schema_name, "schema_": e_schema, "strict": e_schema_strict,
                    "description": ("refused-nested", "response_format.json_schema.description")},
}
MODELS = {"completion": CompletionRequest, "chat": ChatCompletionRequest, "message": ChatMessage,
          "stream_options": StreamOptions, "response_format": ResponseFormat, "json_schema": JsonSchemaFormat}
ENDPOINT = {"completion": "completion", "chat": "chat", "message": "chat", "stream_options": "completion",
            "response_format": "chat", "json_schema": "chat"}


def test_every_field_has_an_entry():
    for kind, model in MODELS.items():
        assert set(model.model_fields) == set(FIELDS[kind]), kind


WALK = [(kind, name) for kind, table in FIELDS.items() for name in table]


@pytest.mark.parametrize("kind,name", WALK, ids=[f"{k}.{n}" for k, n in WALK])
def test_field_is_honoured_or_refused(url, kind, name):
    check = FIELDS[kind][name]
    endpoint = ENDPOINT[kind]
    if isinstance(check, tuple) and check[0] == "refused-nested":
        r = post(url, endpoint, response_format=_schema_format(description="a person"))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == check[1] and "description" in r.json()["error"]["message"]
    elif isinstance(check, tuple):
        r = post(url, endpoint, **{name: check[1]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == name and name in r.json()["error"]["message"]
    else:
        check(url, endpoint)


@pytest.mark.parametrize("kind,fields,param", [
    ("completion", {"min_p": 0.1}, "min_p"),
    ("completion", {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ("chat", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ("completion", {"stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completion", {"logit_bias": {"5000": 1}}, "logit_bias"),
    ("completion", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"min_tokens": 9}, "min_tokens"),
    ("completion", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completion", {"n": 2, "best_of": 3, "stream": True}, "best_of"),
    ("completion", {"n": 17}, "n"),
])
def test_unknown_or_out_of_range_is_refused(url, kind, fields, param):
    r = post(url, kind, **fields)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"], err
