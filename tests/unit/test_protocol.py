import pytest

from cluster.errors import InvalidRequestError
from cluster.genrequest import StopStrings
from cluster.protocol import ChatCompletionRequest, CompletionRequest, parse_request


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
