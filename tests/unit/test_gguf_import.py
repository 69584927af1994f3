"""GGUF import: a make-model directory written as llama.cpp lays out a GGUF comes back
bit-identical (weights, tokenizer ids, chat template); bad files are refused in one line
naming the file, by make-model, validate and the loader alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine.errors import ModelLoadError
from engine.tokenizer import Tokenizer
from models.gguf_import import convert_gguf
from models.make import make_model

from .gguf_writer import write_gguf

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["def main(argv):\n    return 0\n", "Year 2024 has 365 days; x = 3.14159", "  leading spaces\tand tabs",
         "<s>special</s> tokens <|user|> inline", "unicode: café, 東京, 🙂"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {arch: make_model(arch, root / arch) for arch in ("llama", "mixtral")}


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_round_trip_is_exact(made: dict[str, Path], tmp_path: Path, arch: str) -> None:
    src = made[arch]
    gg = write_gguf(src, tmp_path / "m.gguf", chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    out = convert_gguf(gg, tmp_path / "hf")
    want, got = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # q/k un-permuted exactly, experts unstacked
    from engine.config import ModelConfig

    a, b = ModelConfig.from_dir(src), ModelConfig.from_dir(out)
    for f in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
              "num_local_experts", "num_experts_per_tok", "eos_token_ids", "bos_token_id"):
        assert getattr(a, f) == getattr(b, f), f
    ta, tb = Tokenizer.from_dir(src), Tokenizer.from_dir(out)
    for text in TEXTS:
        assert ta.encode(text) == tb.encode(text), text
        assert tb.decode(tb.encode(text), skip_special_tokens=False).endswith(text)
    assert tb.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"  # from chat_template.jinja
    assert tb.encode_chat([{"role": "user", "content": "hi"}]) == [1] + ta.encode("hi", add_bos=False)


def test_transformers_loads_the_conversion(made: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(write_gguf(made["llama"], tmp_path / "m.gguf"), tmp_path / "hf")
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_dir(out)
    for text in TEXTS:
        assert hf_tok(text).input_ids == ours.encode(text), text
    msgs = [{"role": "user", "content": "hello there"}]
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        ours.encode_chat(msgs)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _one_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_bad_files_are_refused_in_one_line(made: dict[str, Path], tmp_path: Path) -> None:
    good = write_gguf(made["llama"], tmp_path / "good.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other_arch = write_gguf(made["llama"], tmp_path / "qwen.gguf", arch="qwen3")
    bad_pre = write_gguf(made["llama"], tmp_path / "pre.gguf", pre="deepseek-coder")
    cases = {truncated: "truncated", other_arch: "architecture 'qwen3' is not supported",
             bad_pre: "pre-tokenizer 'deepseek-coder' is not supported", tmp_path / "missing.gguf": "no such file"}
    for path, reason in cases.items():
        with pytest.raises(ModelLoadError, match=str(path.name)):
            convert_gguf(path, tmp_path / "x")
        r = _cli("make-model", "--from-gguf", str(path), "--out", str(tmp_path / "out"))
        assert r.returncode == 2, r
        line = _one_line(r.stderr)
        assert path.name in line and reason in line, line
    # A manifest may name a GGUF file: converted once, then served like a directory.
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"model": {"path": "good.gguf"}, "mode": "colocated"}))
    assert _cli("validate", str(ok)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"path": "truncated.gguf"}, "mode": "colocated"}))
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    line = _one_line(r.stdout)
    assert line.startswith("model.path: ") and "truncated.gguf" in line and "truncated" in line, line


def test_model_directory_without_tokenizer(made: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "notok"
    shutil.copytree(made["llama"], d)
    (d / "tokenizer.json").unlink()
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"model": {"path": str(d)}, "mode": "colocated"}))
    for cmd in ("validate", "serve"):
        r = _cli(cmd, str(m))
        assert r.returncode == 2, r
        line = _one_line(r.stdout if cmd == "validate" else r.stderr)
        assert line.startswith("model.path: no tokenizer.json in ") and str(d) in line, line
