"""Tokenizer over an HF ``tokenizer.json`` (the ``tokenizers`` package), with the chat
template of ``chat_template.jinja`` or ``tokenizer_config.json`` rendered in a sandboxed jinja2 environment, and
incremental detokenization for streaming.

Encoding equals transformers' AutoTokenizer for the same files: the special tokens added
are those of tokenizer.json's post-processor (for Llama-style tokenizers, a leading BOS),
which is also what transformers v5 uses for PreTrainedTokenizerFast.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Used when the model ships no chat template: "<|role|>\ncontent\n" per message, then the
# assistant header.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p}: not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(v: Any) -> str | None:
    """tokenizer_config special token: a string or an AddedToken dict {"content": ..}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def _chat_template(d: Path, tcfg: dict[str, Any]) -> str | None:
    """The default chat template, where transformers looks for it: ``chat_template.jinja``
    (how transformers >= 4.47 and 5 save it) first, then ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates)."""
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{jinja}: cannot be read: {e}") from None
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ..}, ..]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _compile_template(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tk: HFTokenizer, bos_token_id: int | None, eos_token_ids: list[int],
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None) -> None:
        self.tk = tk
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        # bos_token, eos_token, ... as text, for the chat template.
        self.special_tokens = dict(special_tokens or {})
        self._template: Any = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """tokenizer.json, plus ids and template from tokenizer_config.json, config.json and
        generation_config.json (eos ids: the union, in that order of preference)."""
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"no tokenizer.json in {d} (a fast HF tokenizer is required)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises plain Exception
            raise ModelLoadError(f"{path}: cannot be read by the tokenizers package: {e}") from None
        tcfg = _read_json(d / "tokenizer_config.json")
        cfg = _read_json(d / "config.json")
        gen = _read_json(d / "generation_config.json")
        specials = {n: t for n in _SPECIAL_NAMES if (t := _token_text(tcfg.get(n))) is not None}

        def tok_id(name: str) -> int | None:
            text = specials.get(name)
            return tk.token_to_id(text) if text is not None else None

        eos: list[int] = []
        for eid in _ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id")) + _ids(tok_id("eos_token")):
            if eid not in eos:
                eos.append(eid)
        bos = cfg.get("bos_token_id", gen.get("bos_token_id", tok_id("bos_token")))
        if bos is not None and "bos_token" not in specials and (text := tk.id_to_token(bos)) is not None:
            specials["bos_token"] = text
        if eos and "eos_token" not in specials and (text := tk.id_to_token(eos[0])) is not None:
            specials["eos_token"] = text
        template = _chat_template(d, tcfg)
        if template is None:
            logger.info("%s has no chat template; using the default <|role|> format", d)
            template = None
        return cls(tk, bos, eos, template, specials)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self.tk.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_bos: bool = True, *, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of text. add_bos applies the tokenizer's special-token template (a
        leading BOS for Llama-style tokenizers), as AutoTokenizer does by default;
        add_special_tokens is the transformers spelling of the same switch."""
        specials = add_bos if add_special_tokens is None else add_special_tokens
        return list(self.tk.encode(text, add_special_tokens=specials).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Prompt text for a conversation, rendered like transformers' apply_chat_template
        (the template itself places BOS, so encode it with add_bos=False). tools (OpenAI
        tool definitions) go to templates that use them (supports_tools)."""
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        extra = {} if tools is None else {"tools": tools}
        return str(self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **extra, **self.special_tokens))

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tool definitions (it reads ``tools``)."""
        from jinja2 import meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            names = meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(self.chat_template))
        except Exception:  # noqa: BLE001 - a template jinja cannot parse renders nothing
            return False
        return "tools" in names

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Ids of the chat prompt; equals AutoTokenizer.apply_chat_template(tokenize=True)."""
        return self.encode(self.apply_chat_template(messages, tools=tools), add_bos=False)

    def incremental_detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)


class IncrementalDetokenizer:
    """Text deltas of a growing list of token ids, for streaming. Byte-level tokens may
    end inside a UTF-8 character; such text is held back (never emitted as '\\ufffd')
    until the character completes. Decoding works on a short window of recent ids
    (prefix_offset..) so that decoders that drop a leading space still join correctly:
    the concatenated deltas equal decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: ids before it are no longer decoded
        self.read_offset = 0  # ids before it have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, new_ids: list[int]) -> str:
        """Add ids; return the text that became complete (possibly "")."""
        self.ids.extend(new_ids)
        done = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if len(now) > len(done) and not now.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return now[len(done):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held (an incomplete character is
        emitted as '\\ufffd' here, as a full decode would show it)."""
        done = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return now[len(done):]
