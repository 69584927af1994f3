"""engine.model over the paged KV cache equals transformers on make-model models: greedy
tokens token for token (whole and chunked prefill, batched and alone), bf16 close to
fp32, and the loader's errors name the offending key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.make import make_model
from engine.attention_metadata import AttentionMetadata
from engine.errors import ModelLoadError
from engine.loader import load_model, load_tokenizer
from engine.model import allocate_kv_cache

from .paged_greedy import greedy, hf_greedy

MAX_NEW = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads spinning on 2 busy cores
    slow them down a hundredfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_prompt(n: int, seed: int, vocab: int = 1024) -> list[int]:
    return torch.randint(6, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(arch, root / arch) for arch in ("llama", "mixtral")}


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def pair(request: pytest.FixtureRequest, model_dirs: dict[str, Path]):
    """(model dir, our fp32 model, transformers' fp32 model)."""
    from transformers import AutoModelForCausalLM

    d = model_dirs[request.param]
    hf, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return d, load_model(d, torch.float32), hf.eval()


def prompts_for(d: Path) -> list[list[int]]:
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    return [load_tokenizer(d).encode(text), random_prompt(11, 1), random_prompt(50, 2)]  # 50 + 24 > 64: RoPE cache grows


@pytest.mark.parametrize("chunk", [None, 7])
def test_greedy_equals_transformers_generate(pair, chunk: int | None) -> None:
    d, ours, hf = pair
    for p in prompts_for(d):
        margins: list[float] = []
        got = greedy(ours, [p], MAX_NEW, chunk=chunk, margins=margins)[0]
        want = hf_greedy(hf, p, MAX_NEW)
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert got == want, f"prompt len {len(p)}: diverges at {first_diff}, our margin there " \
                            f"{margins[first_diff] if first_diff is not None else None}"
        assert len(got) == MAX_NEW or got[-1] == 2


def test_batch_of_three_equals_each_alone(pair) -> None:
    d, ours, hf = pair
    prompts = [random_prompt(3, 3), random_prompt(17, 4), random_prompt(29, 5)]
    together = greedy(ours, prompts, MAX_NEW, chunk=7)
    alone = [greedy(ours, [p], MAX_NEW)[0] for p in prompts]
    assert together == alone
    assert together[1] == hf_greedy(hf, prompts[1], MAX_NEW)


def prefill_logits(model, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    n, bs = len(ids), 4
    table = [5, 2, 9, 0, 7, 3, 11, 1][: -(-n // bs)]
    caches = allocate_kv_cache(model.cfg, 12, bs, dtype)
    slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(n)])
    meta = AttentionMetadata([n], [n], [table], slots, bs)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), meta, caches))


def test_prefill_logits_equal_transformers(pair) -> None:
    _, ours, hf = pair
    ids = random_prompt(29, 6)
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0].float()
    got = prefill_logits(ours, ids, torch.float32)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max() < 1e-4


def test_bf16_runs_and_is_close_to_fp32(pair) -> None:
    d, ours, _ = pair
    bf = load_model(d, torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    ids = random_prompt(29, 7)
    ref, got = prefill_logits(ours, ids, torch.float32), prefill_logits(bf, ids, torch.bfloat16)
    assert got.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: logits (std ~4) typically move by a few hundredths to
    # tenths; in Mixtral a token whose top-2 experts flip moves more (transformers' own
    # bf16 run differs from its fp32 run as much), so the bound is on the mean.
    diff = (got - ref).abs()
    assert diff.mean() < 0.1 * ref.std(), (diff.mean(), ref.std())
    assert diff.amax(-1).median() < 0.25 * ref.std(), diff.amax(-1)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    out = greedy(bf, [ids, random_prompt(9, 8)], 8, chunk=7, dtype=torch.bfloat16)
    assert [len(o) for o in out] == [8, 8] or any(o[-1] == 2 for o in out)


def test_sharded_checkpoint_loads_the_same(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = model_dirs["mixtral"]
    d = tmp_path / "sharded"
    shutil.copytree(src, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / f))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = random_prompt(13, 9)
    a, b = load_model(src), load_model(d)
    assert torch.equal(prefill_logits(a, ids, torch.float32), prefill_logits(b, ids, torch.float32))


def test_checkpoint_saved_by_transformers_v5_loads(pair, tmp_path: Path) -> None:
    """transformers v5 writes `dtype` and `rope_parameters` (no rope_theta) and stores
    Mixtral experts fused in memory, but saves hub key names; we load what it writes."""
    d, ours, hf = pair
    hf.save_pretrained(tmp_path / "resaved")
    cfg = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "rope_parameters" in cfg
    ids = random_prompt(17, 12)
    again = load_model(tmp_path / "resaved")
    assert torch.equal(prefill_logits(again, ids, torch.float32), prefill_logits(ours, ids, torch.float32))


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_loader_names_missing_unexpected_and_misshapen_keys(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = model_dirs["llama"]
    key = "model.layers.2.mlp.up_proj.weight"
    d = edited_checkpoint(src, tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        load_model(d)
    d = edited_checkpoint(src, tmp_path / "extra", lambda sd: sd.update({"model.layers.9.foo.weight": torch.ones(2)}))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.9\.foo\.weight"):
        load_model(d)
    key = "model.layers.1.self_attn.k_proj.weight"
    d = edited_checkpoint(src, tmp_path / "shape", lambda sd: sd.update({key: torch.ones(16, 64)}))
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.") + r".*\(16, 64\)"):
        load_model(d)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "nothing-here")
    d = tmp_path / "no-weights"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(d)


def test_sliding_window_equals_transformers_mistral(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A Mistral config (same weights as llama) with a 6-token window: keys older than the
    window are masked in prefill and decode."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "mistral"
    shutil.copytree(model_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=6)
    (d / "config.json").write_text(json.dumps(cfg))
    ours = load_model(d)
    assert ours.cfg.sliding_window == 6
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    p = random_prompt(19, 10)
    assert greedy(ours, [p], 12, chunk=5) == [hf_greedy(hf, p, 12)]
