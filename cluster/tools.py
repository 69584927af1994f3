"""Tool calling: which tools a chat request offers, how the answer is constrained
(tool_choice) and how tool calls are read back out of the generated text.

Tools reach the model through its chat template (engine/tokenizer.py renders ``tools``);
a model whose template does not use them cannot call tools (a 400 naming the model).
Tool calls are read in the Hermes format that tool-trained templates ask for (Qwen 2.5,
Hermes, SmolLM3...): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
tool_choice "required" and a named function constrain the output with a JSON-schema
grammar (as vLLM does): a list of calls, or the named function's arguments."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class ToolPlan:
    # "none": tools shown, no calls read; "auto": calls read if the model writes them;
    # "required": at least one call (grammar); "named": a call of `name` (grammar).
    mode: str
    tools: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None
    parallel: bool = True

    def _params_of(self, name: str) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match, or None (none/auto)."""
        if self.mode == "named":
            assert self.name is not None
            return self._params_of(self.name)
        if self.mode == "required":
            call = {"anyOf": [{"type": "object",
                               "properties": {"name": {"const": t["function"]["name"]},
                                              "arguments": t["function"].get("parameters") or {"type": "object"}},
                               "required": ["name", "arguments"], "additionalProperties": False}
                              for t in self.tools]}
            arr: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
            if not self.parallel:
                arr["maxItems"] = 1
            return arr
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls in OpenAI's format) of a generated text."""
        if self.mode == "none":
            return text, []
        if self.mode == "named":
            return None, [_call(str(self.name), text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut by max_tokens: finish_reason says length
            return None, [_call(c["name"], json.dumps(c["arguments"])) for c in items]
        calls = []
        for m in _CALL.finditer(text):
            try:
                obj = json.loads(m.group(1))
                name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # not a well-formed call: left in the content
            if not any(t["function"]["name"] == name for t in self.tools):
                continue
            calls.append((m, _call(str(name), args if isinstance(args, str) else json.dumps(args))))
            if not self.parallel:
                break
        if not calls:
            return text, []
        content = text
        for m, _ in reversed(calls):
            content = content[:m.start()] + content[m.end():]
        content = content.strip()
        return (content or None), [c for _, c in calls]


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}
