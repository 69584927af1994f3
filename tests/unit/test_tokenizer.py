"""engine.tokenizer equals transformers' AutoTokenizer on make-model's files (encode,
decode, chat template), falls back to a plain chat format, keeps templates sandboxed, and
streams multibyte text without emitting partial characters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest

from models.make import make_model
from engine.errors import ModelLoadError
from engine.tokenizer import Tokenizer

TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "héllo wörld: naïve café, 日本語のテキスト, emoji 🙂🚀 and ZWJ 👩‍💻",
    "  leading and trailing spaces \t\n\n",
    "<|user|>\nspecial tokens in text</s><s>",
    "",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? ünïcödé"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("tok") / "llama")


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_encode_and_decode_equal_autotokenizer(ours: Tokenizer, hf) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ids[:1] == [1]  # BOS from the post-processor
        assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == ours.encode(text, add_bos=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode(TEXTS[1])) == TEXTS[1]
    assert ours.vocab_size == len(hf) == 1024


def test_special_ids(ours: Tokenizer, hf) -> None:
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_ids == [2] == [hf.eos_token_id]
    assert [ours.tk.token_to_id(t) for t in ("<unk>", "<|user|>", "<|assistant|>", "<|system|>")] == [0, 3, 4, 5]


def test_chat_template_equals_transformers(ours: Tokenizer, hf) -> None:
    text = ours.apply_chat_template(CHAT)
    assert text == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>\nBe brief.\n<|user|>\n") and text.endswith("<|assistant|>\n")
    want = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    want_ids = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ours.encode_chat(CHAT) == list(want_ids)
    assert ours.encode_chat(CHAT).count(1) == 1  # one BOS, from the template
    no_prompt = ours.apply_chat_template(CHAT[:2], add_generation_prompt=False)
    assert no_prompt == hf.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=False)


def test_default_chat_format_without_template(model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "no-template"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<s><|user|>\nhi\n<|assistant|>\n"
    assert tok.encode_chat(msgs)[:3] == [1, 3, tok.encode("\n", add_bos=False)[0]]


def test_chat_template_is_sandboxed(ours: Tokenizer) -> None:
    evil = Tokenizer(ours.tk, 1, [2], "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template(CHAT)
    strict = Tokenizer(ours.tk, 1, [2], "{% if messages[0]['role'] != 'user' %}"
                       "{{ raise_exception('first message must be the user') }}{% endif %}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="first message must be the user"):
        strict.apply_chat_template(CHAT)


def test_incremental_detokenizer_never_emits_partial_characters(ours: Tokenizer) -> None:
    text = TEXTS[1] + " — ünïcödé ∑∫ 中文字符 🙂"
    ids = ours.encode(text, add_bos=False)
    # The test means something only if some token boundary splits a character.
    assert any(ours.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    detok = ours.incremental_detokenizer()
    deltas = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # held back at least once
    assert "".join(deltas) + detok.flush() == text == ours.decode(ids)


def test_incremental_detokenizer_skips_special_tokens_and_flushes_incomplete_tail(ours: Tokenizer) -> None:
    ids = [1] + ours.encode("a 日本", add_bos=False) + [2]
    detok = ours.incremental_detokenizer()
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == "a 日本"
    cut = ours.encode("🙂", add_bos=False)
    assert len(cut) > 1
    detok = ours.incremental_detokenizer()
    assert detok.push(cut[:-1]) == ""
    assert detok.flush().endswith("\ufffd")  # an unfinished character at the very end is shown


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
