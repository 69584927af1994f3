"""Tools through the served path (openai client), on the tiny model given a Hermes-style
tool chat template: tools are rendered by the template (the prompt equals transformers'
apply_chat_template with tools), a named tool_choice and "required" give calls whose
arguments validate against the function's parameters (grammar; the first token masked on
the prefill worker), streamed and not; and every field of the tool request models is
shown to have its effect. A model without tool support answers 400 naming the model
(tests/integration/test_request_fields.py)."""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest

from cluster.protocol import CalledFunction, ChosenFunction, FunctionDef, NamedToolChoice, ToolCall, ToolDef
from cluster.tools import ToolPlan
from engine.tokenizer import Tokenizer

from .conftest import manifest_for, serving

TEMPLATE = """{%- if tools %}<|system|>
You may call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|tool|>
[{{ message.tool_call_id }}] {{ message.content }}
{% elif message.tool_calls %}<|assistant|>
{% for call in message.tool_calls %}<tool_call>{"id": "{{ call.id }}", "type": "{{ call.type }}", \
"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments }}}</tool_call>
{% endfor %}
{%- else %}<|{{ message.role }}|>
{{ message.content }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                           "parameters": TIME}}]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_dir(tmp_path_factory, llama_dir):
    d = tmp_path_factory.mktemp("toolmodel") / "tiny-tools"
    shutil.copytree(llama_dir, d)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


@pytest.fixture(scope="module")
def client(ray_session, tool_dir):
    with serving(manifest_for(tool_dir)) as (url, _dep):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)


def chat(client, stream=False, **kw):
    body = dict(model="tiny", messages=kw.pop("messages", MSGS), max_tokens=kw.pop("max_tokens", 80), temperature=1.0,
                seed=kw.pop("seed", 1), **kw)
    if not stream:
        r = client.chat.completions.create(**body)
        return r.choices[0].message, r.choices[0].finish_reason, r.usage
    content, calls, reason = "", [], None
    for chunk in client.chat.completions.create(stream=True, **body):
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            reason = c.finish_reason or reason
    return {"content": content, "tool_calls": calls}, reason, None


def test_tools_rendered_like_transformers(tool_dir, client):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tool_dir)
    want = hf.apply_chat_template(MSGS, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    ours = Tokenizer.from_dir(tool_dir)
    assert ours.supports_tools
    assert ours.encode_chat(MSGS, tools=TOOLS) == list(want)
    _, _, with_tools = chat(client, tools=TOOLS, tool_choice="none", max_tokens=2)
    _, _, without = chat(client, max_tokens=2)
    assert with_tools.prompt_tokens == len(want) > without.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_gives_a_valid_call(client, stream):
    for seed in range(4):
        msg, reason, _ = chat(client, stream, tools=TOOLS, seed=seed,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
        calls = msg["tool_calls"] if stream else msg.tool_calls
        assert reason == "tool_calls" and len(calls) == 1
        assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_valid_calls(client, parallel):
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    names = set()
    for seed in range(6):
        msg, reason, _ = chat(client, tools=TOOLS, seed=seed, tool_choice="required", max_tokens=150,
                              parallel_tool_calls=parallel)
        assert reason == "tool_calls" and msg.content is None and msg.tool_calls
        if not parallel:
            assert len(msg.tool_calls) == 1
        for call in msg.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            names.add(call.function.name)
            assert call.id.startswith("call_") and call.type == "function"


def test_auto_reads_hermes_calls():
    plan = ToolPlan("auto", TOOLS)
    text = ('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')
    content, calls = plan.parse(text)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    assert content.startswith("Sure.") and "unknown" in content
    assert len(ToolPlan("auto", TOOLS, parallel=False).parse(text)[1]) == 1
    assert ToolPlan("auto", TOOLS).parse("no calls here") == ("no calls here", [])
    assert ToolPlan("none", TOOLS).parse(text) == (text, [])


HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def prompt_tokens(client, **kw) -> int:
    return chat(client, max_tokens=1, **kw)[2].prompt_tokens


def _history(**change) -> list[dict]:
    h = json.loads(json.dumps(HISTORY))
    call = h[1]["tool_calls"][0]
    for key, value in change.items():
        if key in ("name", "arguments"):
            call["function"][key] = value
        elif key == "tool_call_id":
            h[2]["tool_call_id"] = value
        else:
            call[key] = value
    return h


# Every field of the tool request models: its effect on the tool-capable server.
def f_tooldef_type(c):
    with pytest.raises(openai.BadRequestError):
        chat(c, tools=[{"type": "retrieval", "function": TOOLS[0]["function"]}])
    assert prompt_tokens(c, tools=TOOLS, tool_choice="none") > prompt_tokens(c)


def f_tooldef_function(c):
    assert prompt_tokens(c, tools=TOOLS[:1], tool_choice="none") < prompt_tokens(c, tools=TOOLS, tool_choice="none")


def f_function_name(c):
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "name": "forecast"}}]
    msg, _, _ = chat(c, tools=tools, tool_choice={"type": "function", "function": {"name": "forecast"}})
    assert msg.tool_calls[0].function.name == "forecast"


def f_function_description(c):
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "description": "A much longer description"}}]
    assert prompt_tokens(c, tools=tools, tool_choice="none") > prompt_tokens(c, tools=TOOLS[:1], tool_choice="none")


def f_function_parameters(c):
    msg, _, _ = chat(c, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(msg.tool_calls[0].function.arguments)["zone"] in ("UTC", "CET")


def f_function_strict(c):
    for strict in (True, False):
        tools = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": strict}}]
        msg, _, _ = chat(c, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), WEATHER)


def f_history(field, value):
    def check(c):
        assert prompt_tokens(c, messages=_history(**{field: value})) != prompt_tokens(c, messages=HISTORY)
    return check


def f_call_type(c):
    with pytest.raises(openai.BadRequestError):
        chat(c, messages=_history(type="other"))
    assert prompt_tokens(c, messages=HISTORY) > prompt_tokens(c, messages=HISTORY[:1])


def f_named(c):
    for name in ("get_weather", "get_time"):
        msg, _, _ = chat(c, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}})
        assert msg.tool_calls[0].function.name == name
    with pytest.raises(openai.BadRequestError):
        chat(c, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


FIELDS = {
    ToolDef: {"type": f_tooldef_type, "function": f_tooldef_function},
    FunctionDef: {"name": f_function_name, "description": f_function_description,
                  "parameters": f_function_parameters, "strict": f_function_strict},
    ToolCall: {"id": f_history("id", "call_999999"), "type": f_call_type, "function": f_history("name", "get_time")},
    CalledFunction: {"name": f_history("name", "get_time"),
                     "arguments": f_history("arguments", '{"city": "Lima", "days": 7}')},
    NamedToolChoice: {"type": f_named, "function": f_named},
    ChosenFunction: {"name": f_named},
}
WALK = [(m, f) for m, table in FIELDS.items() for f in table]


def test_every_tool_field_has_an_entry():
    for model, table in FIELDS.items():
        assert set(model.model_fields) == set(table), model.__name__


@pytest.mark.parametrize("model,name", WALK, ids=[f"{m.__name__}.{f}" for m, f in WALK])
def test_tool_field_has_its_effect(client, model, name):
    FIELDS[model][name](client)


def test_message_tool_fields_rendered(client):
    # ChatMessage.tool_calls and tool_call_id (the walk of test_request_fields refuses them
    # on a model without tool support).
    assert prompt_tokens(client, messages=HISTORY) > prompt_tokens(client, messages=HISTORY[:1])
    assert prompt_tokens(client, messages=_history(tool_call_id="call_1234567")) != prompt_tokens(
        client, messages=HISTORY)
