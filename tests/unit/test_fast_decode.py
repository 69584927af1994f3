"""The decode path's hand-fused ops compute bit for bit what they replace (so fp32 greedy
stays equal to transformers), and the compiled decode forward (engine.compiled,
SPLITSERVE_COMPILE=decode) generates what the eager engine does and is really used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.attention import _decode_batch, write_kv
from engine.compiled import compile_mode
from engine.config import ModelConfig
from engine.engine import LLMEngine
from engine.model import RMSNorm
from engine.rope import Rotary, apply_rotary, rotate
from engine.sequence import SamplingParams
from models.make import make_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")


def test_rotate_is_bit_identical_to_apply_rotary(tiny_llama_dir: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    rot = Rotary(cfg)
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 5, 17, 300, 1023])
    x = torch.randn(len(positions), 5, cfg.head_dim, generator=g)
    cos, sin = rot.cos_sin(positions, torch.float32)
    want = apply_rotary(x, cos, sin)
    assert torch.equal(rotate(x, *rot.tables(positions, torch.float32)), want)
    # On a strided view too (the model rotates a slice of the fused q/k/v output).
    wide = torch.randn(len(positions), 8 * cfg.head_dim, generator=g)
    view = wide[:, : 5 * cfg.head_dim].view(len(positions), 5, cfg.head_dim)
    assert torch.equal(rotate(view, *rot.tables(positions, torch.float32)), apply_rotary(view, cos, sin))


def test_rmsnorm_fp32_is_bit_identical_to_transformers() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    ours, theirs = RMSNorm(576, 1e-5, torch.float32), LlamaRMSNorm(576, eps=1e-5)
    w = torch.randn(576, generator=g)
    ours.weight.copy_(w)
    with torch.no_grad():
        theirs.weight.copy_(w)
    for rows in (1, 3, 8, 160, 512):
        x = torch.randn(rows, 576, generator=g) * 3
        assert torch.equal(ours(x), theirs(x))
    for n in (64, 1000):  # other widths: vectorised main loop and a remainder
        ours, theirs = RMSNorm(n, 1e-6, torch.float32), LlamaRMSNorm(n, eps=1e-6)
        w = torch.randn(n, generator=g)
        ours.weight.copy_(w)
        with torch.no_grad():
            theirs.weight.copy_(w)
        x = torch.randn(5, n, generator=g)
        assert torch.equal(ours(x), theirs(x))


def test_write_kv_writes_keys_and_values_at_their_slots() -> None:
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 6, 4, 3, 8, generator=g)
    want = cache.clone()
    k, v = torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    slots = torch.tensor([3, 9, 10, 22, 0])
    write_kv(cache, k, v, slots)
    flat = want.view(2, -1, 3, 8)
    flat[0, slots], flat[1, slots] = k, v
    assert torch.equal(cache, want)


def test_decode_attention_is_bit_identical_to_sdpa_with_a_bool_mask() -> None:
    """The step's additive mask (made once) gives what SDPA gives with the bool mask."""
    g = torch.Generator().manual_seed(3)
    bs, kvh, heads, hd = 4, 3, 9, 16
    cache = torch.randn(2, 12, bs, kvh, hd, generator=g)
    tables, ctx = [[5, 2, 7, 0], [1, 0, 0, 0], [0, 11, 3, 4]], [10, 3, 16]
    q = torch.randn(3, heads, hd, generator=g)
    got = _decode_batch(q, cache, tables, ctx, hd ** -0.5, None)
    kv = cache.index_select(1, torch.tensor(sum(tables, []))).view(2, 3, 4 * bs, kvh, hd)
    mask = (torch.arange(4 * bs)[None, :] < torch.tensor(ctx)[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0].transpose(1, 2), kv[1].transpose(1, 2),
                                          attn_mask=mask, scale=hd ** -0.5, enable_gqa=True).squeeze(2)
    assert torch.equal(got, want)


def test_compile_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_COMPILE", raising=False)
    assert compile_mode() == "off"
    monkeypatch.setenv("SPLITSERVE_COMPILE", "all")
    with pytest.raises(ValueError, match="SPLITSERVE_COMPILE='all': allowed off, decode"):
        compile_mode()


def _generate(model_dir: Path) -> tuple[LLMEngine, list[list[int]]]:
    eng = LLMEngine.from_model_dir(model_dir, "float32", num_blocks=64, block_size=8)
    # Lengths differ: decode batches of 4, then 3, 2, 1 as sequences finish.
    prompts = [[3 + (i * 7 + j) % 200 for j in range(5 + 3 * i)] for i in range(4)]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 4 * i, ignore_eos=True) for i in range(4)]
    seqs = [eng.add_request(f"r{i}", p, params[i]) for i, p in enumerate(prompts)]
    while eng.has_work:
        eng.step()
    return eng, [s.output_token_ids for s in seqs]


@pytest.mark.slow
def test_compiled_decode_generates_what_eager_does(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSERVE_COMPILE", "off")
    eager_eng, eager = _generate(tiny_llama_dir)
    assert eager_eng.runner.compiled is None
    monkeypatch.setenv("SPLITSERVE_COMPILE", "decode")
    eng, got = _generate(tiny_llama_dir)
    c = eng.runner.compiled
    assert c is not None and c.broken is None, c and c.broken
    assert c.calls > 10  # the decode steps ran compiled, at several batch sizes
    assert got == eager


@pytest.mark.parametrize("window", [None, 5, 40])
def test_paged_kernel_matches_gather_and_sdpa(window: int | None) -> None:
    from engine.paged_kernel import decode_tables, kernel, paged_decode

    assert kernel() is not None  # numba is a core dependency: the kernel builds everywhere
    g = torch.Generator().manual_seed(4)
    bs, kvh, heads, hd = 4, 3, 9, 64
    cache = torch.randn(2, 40, bs, kvh, hd, generator=g)
    # Shuffled blocks, contexts ending mid-block, on a block edge, and a single position.
    tables = [[5, 2, 7, 0, 9, 30, 31, 12, 13, 14, 15, 16], [1, 0], [0, 11, 3, 4, 20, 21, 22, 23, 24]]
    ctx = [45, 1, 36]
    q = torch.randn(3, heads, hd, generator=g)
    want = _decode_batch(q, cache, tables, ctx, hd ** -0.5, window)
    table, lens = decode_tables(tables, ctx, bs)
    assert table.shape == (3, 12) and lens.tolist() == ctx
    got = paged_decode(q, cache, table, lens, hd ** -0.5, window)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (got - want).abs().max()
    # A strided query (the model passes a slice of its fused q/k output) gives the same.
    wide = torch.randn(3, heads + kvh, hd, generator=g)
    wide[:, :heads] = q
    assert torch.equal(paged_decode(wide[:, :heads], cache, table, lens, hd ** -0.5, window), got)


def test_paged_kernel_softmax_holds_at_large_score_gaps() -> None:
    # The kernel's exp is its own (engine._paged_kernel): scores far apart (a dominant key,
    # keys whose exp underflows) must still give SDPA's weights.
    from engine.paged_kernel import decode_tables, paged_decode

    g = torch.Generator().manual_seed(5)
    bs, kvh, heads, hd = 16, 1, 2, 8
    cache = torch.randn(2, 4, bs, kvh, hd, generator=g)
    cache[0, 0, 3] *= 40.0  # one key far above the rest
    cache[0, 1, :5] *= -30.0
    q = torch.randn(1, heads, hd, generator=g) * 3
    table, lens = decode_tables([[0, 1, 2]], [40], bs)
    want = _decode_batch(q, cache, [[0, 1, 2]], [40], 1.0, None)
    got = paged_decode(q, cache, table, lens, 1.0, None)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_paged_kernel_generates_what_sdpa_does(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.paged_kernel import kernel_mode

    monkeypatch.setenv("SPLITSERVE_PAGED_KERNEL", "0")
    _, want = _generate(tiny_llama_dir)
    import engine.paged_kernel as pk

    calls = []
    real = pk.paged_decode
    monkeypatch.setattr(pk, "paged_decode", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setenv("SPLITSERVE_PAGED_KERNEL", "auto")
    _, got = _generate(tiny_llama_dir)
    assert got == want
    assert set(calls) == {1, 2, 3, 4}  # every decode batch size went through the kernel
    monkeypatch.setenv("SPLITSERVE_PAGED_KERNEL", "yes")
    with pytest.raises(ValueError, match="SPLITSERVE_PAGED_KERNEL='yes': allowed auto, 1, 0"):
        kernel_mode()


def test_compute_threads_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.threads import compute_threads

    monkeypatch.delenv("SPLITSERVE_THREADS", raising=False)
    assert (compute_threads(2), compute_threads(0.5)) == (2, 1)
    monkeypatch.setenv("SPLITSERVE_THREADS", "reserve")
    assert (compute_threads(2), compute_threads(1), compute_threads(8)) == (1, 1, 7)
    monkeypatch.setenv("SPLITSERVE_THREADS", "3")
    assert compute_threads(2) == 3
    for bad in ("0", "many"):
        monkeypatch.setenv("SPLITSERVE_THREADS", bad)
        with pytest.raises(ValueError, match="allowed auto, reserve or a positive integer"):
            compute_threads(2)
