"""Tensor parallelism: tp=2 over gloo in two processes gives the same greedy tokens as
tp=1 (llama and mixtral, a batch of mixed-length prompts with chunked prefill), bf16
all-reduces work, and a tp that does not divide the heads is refused up front."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.make import make_model
from engine.errors import ModelLoadError
from engine.loader import load_model

from .paged_greedy import greedy

ARCHS = ("llama", "mixtral")
MAX_NEW = 16


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(6, 1024, (n,), generator=g).tolist() for n in (5, 19, 33)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, dirs: dict[str, str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result: dict[str, object] = {}
        for arch, d in dirs.items():
            model = load_model(d, torch.float32, tp_rank=rank, tp_size=world, tp_group=dist.group.WORLD)
            result[arch] = greedy(model, prompts(), MAX_NEW, chunk=7)
            heads = model.layers[0].self_attn.heads, model.layers[0].self_attn.kv_heads
            result[arch + "_local_heads"] = list(heads)
            bf = load_model(d, torch.bfloat16, tp_rank=rank, tp_size=world, tp_group=dist.group.WORLD)
            result[arch + "_bf16"] = greedy(bf, prompts()[:2], 4, dtype=torch.bfloat16)
        Path(out.format(rank=rank)).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    return {arch: make_model(arch, root / arch) for arch in ARCHS}


def test_tp2_greedy_equals_tp1(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = str(tmp_path / "rank{rank}.json")
    dirs = {a: str(d) for a, d in model_dirs.items()}
    mp.spawn(_rank_main, args=(2, _free_port(), dirs, out), nprocs=2, join=True)
    ranks = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(2)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for arch, d in model_dirs.items():
            want = greedy(load_model(d), prompts(), MAX_NEW, chunk=7)
            assert ranks[0][arch] == want, arch
            assert ranks[1][arch] == want, arch
            assert ranks[0][arch + "_local_heads"] == [2, 1]  # 4 q heads, 2 kv heads over 2 ranks
            assert ranks[0][arch + "_bf16"] == ranks[1][arch + "_bf16"]
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("tp, what", [(3, "4 attention heads"), (4, "2 key-value heads")])
def test_tp_that_does_not_divide_heads_is_refused(model_dirs: dict[str, Path], tp: int, what: str) -> None:
    with pytest.raises(ModelLoadError, match=f"tensor parallel size {tp} does not divide the model's {what}"):
        load_model(model_dirs["llama"], tp_rank=0, tp_size=tp)


def test_tp1_never_touches_torch_distributed(model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("torch.distributed called with tp=1")

    monkeypatch.setattr(dist, "all_reduce", forbidden)
    model = load_model(model_dirs["mixtral"])
    assert len(greedy(model, prompts()[:1], 3)[0]) == 3
