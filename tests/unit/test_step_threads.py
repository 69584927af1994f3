"""Per-step torch threads (engine.step_threads, SPLITSERVE_DECODE_THREADS): the policy
from the environment, the switch on the stepping thread, and outputs unchanged."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from engine.step_threads import StepThreads, decode_threads
from models.make import make_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("llama", tmp_path_factory.mktemp("m") / "llama")


def test_decode_threads_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPLITSERVE_DECODE_THREADS", raising=False)
    assert (decode_threads(2), decode_threads(1)) == (2, 1)
    assert StepThreads.for_worker(2) is None  # nothing to switch by default
    monkeypatch.setenv("SPLITSERVE_DECODE_THREADS", "reserve")
    assert (decode_threads(2), decode_threads(1), decode_threads(8)) == (1, 1, 7)
    policy = StepThreads.for_worker(2)
    assert policy is not None and (policy.prefill, policy.decode) == (2, 1)
    assert StepThreads.for_worker(1) is None
    monkeypatch.setenv("SPLITSERVE_DECODE_THREADS", "3")
    assert (decode_threads(2), decode_threads(8)) == (2, 3)  # never more than the worker has
    for bad in ("0", "few"):
        monkeypatch.setenv("SPLITSERVE_DECODE_THREADS", bad)
        with pytest.raises(ValueError, match="allowed same, reserve or a positive integer"):
            decode_threads(2)


def test_apply_sets_the_calling_threads_count_by_step_kind() -> None:
    seen: list[tuple[int, int]] = []

    def run() -> None:  # a thread of its own: the test process's threads stay as they are
        policy = StepThreads(prefill=2, decode=1)
        for tokens in ([1, 1, 1], [1, 37], [5], [1]):
            seen.append((policy.apply(tokens), torch.get_num_threads()))
        seen.append((policy.switches, -1))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert seen == [(1, 1), (2, 2), (2, 2), (1, 1), (3, -1)]


def test_engine_with_step_threads_generates_the_same(tiny_llama_dir: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (9, 23, 40)]

    def run(policy: StepThreads | None) -> list[list[int]]:
        out: list[list[int]] = []

        def go() -> None:
            eng = LLMEngine.from_model_dir(tiny_llama_dir, num_blocks=64, block_size=4,
                                           scheduler_config=SchedulerConfig(max_num_batched_tokens=16,
                                                                            max_model_len=512),
                                           step_threads=policy)
            out.extend(eng.generate(prompts, params))

        t = threading.Thread(target=go)
        t.start()
        t.join(timeout=120)
        return out

    policy = StepThreads(prefill=2, decode=1)
    assert run(policy) == run(None)
    assert policy.switches >= 2  # prefill chunks on 2 threads, then decode steps on 1
