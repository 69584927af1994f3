"""Never wrong: requests aborted while their KV is in flight (gRPC, paced so that it is)
leave the greedy outputs of concurrent requests unchanged and nothing held; prefill and
decode pools of different tensor-parallel degrees give transformers' greedy tokens."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from .conftest import manifest_for, serving
from .test_failures import wait_kv_released
from .test_serving_equivalence import prompts, reference, served


def test_aborts_while_kv_in_flight_leave_others_unchanged(ray_session, llama_dir):
    common = {"tp": 1, "num_cpus": 1, "max_num_batched_tokens": 256}
    m = manifest_for(llama_dir, pools={"prefill": {**common, "num_kv_blocks": 256},
                                       # Few blocks: aborted requests' blocks go to others at once.
                                       "decode": {**common, "num_kv_blocks": 96}},
                     # ~1 KB of KV per token at 0.5 MB/s: a 200-token prompt's KV takes 0.4 s.
                     kv_transfer={"transport": "grpc", "codec": "none", "rate_limit_gbps": 0.004})
    goods = [" ".join(f"w{i}_{j} = {j} * {i}" for j in range(8 + 3 * i)) for i in range(4)]
    victims = [" ".join(f"z{i}_{j}" for j in range(120)) for i in range(6)]
    body = {"model": "tiny", "temperature": 0, "ignore_eos": True}
    with serving(m) as (url, dep):
        with httpx.Client(timeout=120) as http:
            expected = {p: http.post(f"{url}/v1/completions", json={**body, "prompt": p, "max_tokens": 16}
                                     ).json()["choices"][0]["text"] for p in goods}
        got: list[tuple[str, int, str]] = []
        errors: list[BaseException] = []

        def good(p: str) -> None:
            try:
                r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": p, "max_tokens": 16}, timeout=120)
                got.append((p, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(e)

        def victim(p: str) -> None:
            # The first chunk (the prefill's token) comes while the KV is still moving:
            # leave then, so the decode side aborts the request mid-transfer.
            try:
                with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                                  json={**body, "prompt": p, "max_tokens": 64, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            return
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(e)

        for _round in range(2):
            threads = [threading.Thread(target=victim, args=(p,)) for p in victims]
            threads += [threading.Thread(target=good, args=(p,)) for p in goods]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=240)
        assert not errors, errors
        assert len(got) == 2 * len(goods)
        for p, status, text in got:
            assert status == 200, text
            assert text == expected[p]
        wait_kv_released(dep)


@pytest.fixture(scope="module")
def llama_case(llama_dir):
    import json

    vocab = json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    ps = prompts(vocab)[:8]
    return ps, reference(llama_dir, ps)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_mismatched_tp_matches_transformers(ray_session, llama_dir, llama_case, prefill_tp, decode_tp):
    ps, ref = llama_case
    common = {"num_cpus": 1, "num_kv_blocks": 256, "max_num_batched_tokens": 256}
    m = manifest_for(llama_dir, pools={"prefill": {**common, "tp": prefill_tp},
                                       "decode": {**common, "tp": decode_tp}})
    with serving(m) as (url, dep):
        got = asyncio.run(served(url, ps))
        wait_kv_released(dep)
    assert got == ref, f"prefill tp {prefill_tp} -> decode tp {decode_tp}"
