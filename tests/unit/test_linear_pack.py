"""engine.linear: oneDNN-packed linears compute what F.linear computes (to rounding), the
engine packs fp32 and bf16 by default and nothing with SPLITSERVE_LINEAR=torch, and a
packed model generates what the unpacked one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.engine import LLMEngine
from engine.linear import PackedWeight, linear_mode, packing_enabled
from engine.sequence import SamplingParams
from models.make import make_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")



@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 3, 17])
def test_packed_equals_linear(dtype: torch.dtype, tol: float, rows: int) -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g).to(dtype)
    x = torch.randn(2, rows, 40, generator=g).to(dtype)
    got, want = PackedWeight(w)(x), F.linear(x, w)
    assert got.shape == want.shape == (2, rows, 96) and got.dtype == dtype
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    with pytest.raises(TypeError, match="dtype"):
        PackedWeight(w)(x.double())


def test_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_LINEAR", raising=False)
    assert linear_mode() == "auto" and packing_enabled("cpu", torch.float32) == torch.backends.mkldnn.is_available()
    monkeypatch.setenv("SPLITSERVE_LINEAR", "torch")
    assert not packing_enabled("cpu", torch.bfloat16)
    monkeypatch.setenv("SPLITSERVE_LINEAR", "fast")
    with pytest.raises(ValueError, match="SPLITSERVE_LINEAR='fast': allowed auto, onednn, torch"):
        linear_mode()


def _generate(model_dir: Path, dtype: str) -> tuple[LLMEngine, list[list[int]]]:
    eng = LLMEngine.from_model_dir(model_dir, dtype, num_blocks=64, block_size=8)
    prompts = [[3 + (i * 7 + j) % 200 for j in range(5 + 3 * i)] for i in range(4)]
    return eng, eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_packs_by_mode_and_generates_the_same(tiny_llama_dir: Path, dtype: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setenv("SPLITSERVE_LINEAR", "torch")
    plain_eng, plain = _generate(tiny_llama_dir, dtype)
    assert plain_eng.runner.model.lm_head_packed is None
    monkeypatch.setenv("SPLITSERVE_LINEAR", "onednn")
    eng, packed = _generate(tiny_llama_dir, dtype)
    layer = eng.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.packed is not None and layer.mlp.down_proj.packed is not None
    assert layer.mlp.gate_up_proj.weight.numel() == 0  # the plain copy was freed
    assert eng.runner.model.lm_head_packed is not None
    assert packed == plain
    monkeypatch.delenv("SPLITSERVE_LINEAR")
    auto_eng, _ = _generate(tiny_llama_dir, dtype)
    assert auto_eng.runner.model.lm_head_packed is not None
