import pytest

from cluster.errors import InvalidRequestError
from cluster.genrequest import StopStrings
import json
import random

from cluster.protocol import ChatCompletionRequest, CompletionRequest, parse_json_request, parse_request


def test_valid_completion():
    r = parse_request(CompletionRequest, {"model": "m", "prompt": "hi", "max_tokens": 3, "stop": "x"})
    assert r.single_prompt() == "hi" and r.stop == ["x"]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"model": "m", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"model": "m", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "m", "prompt": "hi", "n": 0}, "n"),
    ({"model": "m", "prompt": 5}, "prompt"),
    # Strict types (OpenAI's API does not coerce either).
    ({"model": "m", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "hi", "stream": 1}, "stream"),
    ({"model": "m", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "hi", "max_tokens": 5.0}, "max_tokens"),
    ({"model": "m", "prompt": "hi", "temperature": "0.5"}, "temperature"),
    ({"model": "m", "prompt": "hi", "seed": True}, "seed"),
    ({"model": 7, "prompt": "hi"}, "model"),
])
def test_bad_completion_names_field(body, param):
    with pytest.raises(InvalidRequestError) as e:
        parse_request(CompletionRequest, body)
    assert e.value.param.split(".")[0] == param


def test_strict_types_still_take_what_json_means():
    r = parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2], "temperature": 1, "top_p": 1,
                                          "stream": True, "stream_options": {"include_usage": True}})
    assert r.temperature == 1.0 and r.stream and r.stream_options.include_usage
    c = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert c.messages[0].text() == "hi"
    with pytest.raises(InvalidRequestError) as e:
        parse_request(CompletionRequest, {"model": "m", "prompt": "hi", "stream": "yes"})
    assert e.value.message == "stream: Input should be a valid boolean, got 'yes'"


def test_empty_prompt_and_messages():
    with pytest.raises(InvalidRequestError, match="prompt must not be empty"):
        parse_request(CompletionRequest, {"model": "m", "prompt": ""}).single_prompt()
    with pytest.raises(InvalidRequestError) as e:
        parse_request(ChatCompletionRequest, {"model": "m", "messages": []})
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequestError):
        parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_request(CompletionRequest, ["not", "an", "object"])


def test_stop_strings_hold_back_and_cut():
    s = StopStrings(["END"])
    assert s.feed("hello E", final=False) == ("hello ", False)
    assert s.feed("N", final=False) == ("", False)
    assert s.feed("D more", final=False) == ("", True)
    s = StopStrings(["END"])
    assert s.feed("abc", final=False) == ("abc", False)
    assert s.feed("xxEN", final=False) == ("xx", False)
    assert s.feed("", final=True) == ("EN", False)
    s = StopStrings([])
    assert s.feed("abc", final=False) == ("abc", False)


def _outcome(parse, cls, arg):
    try:
        return "ok", parse(cls, arg).model_dump()
    except InvalidRequestError as e:
        return "error", e.message, e.param


# Bodies where pydantic's JSON parser and json.loads + strict validation could part ways:
# ints for floats, floats for ints, big ints, NaN, duplicate keys, lone surrogates, a BOM,
# invalid UTF-8, non-objects, floats at the edges inside free-form (Any) fields.
_RAW = [
    b'{"model":"m","prompt":[1,2],"temperature":1,"top_p":1,"logit_bias":{"5":1}}',
    b'{"model":"m","prompt":"a","seed":1.0}',
    b'{"model":"m","prompt":"a","seed":123456789012345678901234567890}',
    b'{"model":"m","prompt":"a","prompt":"b"}',
    b'{"model":"m","prompt":"\\ud800x"}',
    b'{"model":"m","prompt":"a","temperature":NaN}',
    b'{"model":"m","prompt":"a","temperature":Infinity}',
    b'\xef\xbb\xbf{"model":"m","prompt":"a"}',
    b'{"model":"m","prompt":"\xff"}',
    b'{"model":"m","prompt":"a"} x',
    b'[1, 2]',
    b'"text"',
    b'',
    b'{"model":"m","prompt":"a","max_tokens":true}',
    b'{"model":"m","prompt":"a","temperature":"1"}',
    b'{"model":"m","prompt":[[1,2],[3]],"stop":"x"}',
    b'{"model":"m","prompt":[]}',
    b'{"model":"m","prompt":"a","top_p":5e-324,"temperature":1e-320}',
    b'{"model":"m","prompt":"a","guided_json":{"x":1e400,"y":-0.0,"z":123456789012345678901234567890,"w":0.1}}',
    b'{"model":"m","prompt":"a","unknown":1}',
    b'{"model":"m","prompt":"a","suffix":"s"}',
    b'{"model":"m","prompt":"a","stream":true,"stream_options":{"include_usage":true}}',
]
_CHAT = [
    b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"tool_choice":"auto",'
    b'"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}',
    b'{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema",'
    b'"json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"maximum":1.5}}}}}}',
    b'{"model":"m","messages":[{"role":"user","content":"hi"}],"tool_choice":"auto"}',
    b'{"model":"m","messages":[]}',
]


def _old_way(cls, raw):
    """What the ingress did before parse_json_request: json.loads, then parse_request."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    return parse_request(cls, body)


@pytest.mark.parametrize("cls,raw", [(CompletionRequest, r) for r in _RAW] + [(ChatCompletionRequest, r) for r in _CHAT])
def test_one_pass_parse_is_the_two_pass_parse(cls, raw):
    """parse_json_request (one pass) accepts, refuses and words its errors exactly as
    json.loads + parse_request did."""
    assert _outcome(parse_json_request, cls, raw) == _outcome(_old_way, cls, raw)


def test_one_pass_parse_reads_floats_as_json_loads():
    rng = random.Random(17)
    for _ in range(3000):
        x = rng.choice([rng.random(), rng.uniform(-1e308, 1e308), rng.random() * 10.0 ** rng.randint(-320, 308)])
        text = repr(x) if rng.random() < 0.5 else f"{x:.{rng.randint(1, 25)}g}"
        raw = ('{"model":"m","prompt":"a","temperature":0.5,"guided_json":{"v":%s}}' % text).encode()
        a, b = _outcome(parse_json_request, CompletionRequest, raw), _outcome(_old_way, CompletionRequest, raw)
        assert a == b, text
        if a[0] == "ok":
            assert type(a[1]["guided_json"]["v"]) is type(b[1]["guided_json"]["v"]), text
