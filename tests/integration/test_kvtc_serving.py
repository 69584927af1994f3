"""kvtc on the serving path (issue 19): a real cluster (1 prefill + 1 decode worker, KV
over gRPC on loopback) with ``kv_transfer.codec: kvtc`` codes the prompt's KV with the
model's calibration (loaded by both workers from beside the model) and answers what the
same cluster answers with raw KV; and an adaptive prefill worker over kvtc offers only
levels whose stored cost is within the quality floor.

The tiny model's calibration is computed once for the module (a copy of tiny-llama, a
few seconds); SmolLM2 (the real model, its calibration cached by ``python -m
kvtransfer.codecs.kvtc``) answers a factual question through kvtc in the slow test."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
import ray

from .conftest import manifest_for, serving

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"


def _counter(text: str, name: str, label: str = "") -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


@pytest.fixture(scope="module")
def kvtc_model(tmp_path_factory, llama_dir):
    from kvtransfer.codecs.kvtc import calibrate_model
    from kvtransfer.codecs.kvtc_calib import cache_path

    d = tmp_path_factory.mktemp("kvtc") / "model"
    shutil.copytree(llama_dir, d, ignore=shutil.ignore_patterns("kvtc-*"))
    cal = calibrate_model(d, windows=1, ctx=96, cont=16, measure_windows=2, measure_ctx=96, measure_cont=16)
    cal.save(cache_path(d))
    return d, cal


def _complete(url: str, prompt: str, n: int) -> tuple[str, list[str]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == n
    return r.choices[0].text, httpx.get(f"{url}/metrics", timeout=10).text.splitlines()


def test_kvtc_codes_the_kv_of_a_served_request(ray_session, kvtc_model):
    d, cal = kvtc_model
    kt = {"transport": "grpc", "max_quality_loss": 10.0}  # the tiny model's KV is nearly noise: any level
    with serving(manifest_for(d, kv_transfer={"codec": "none", **kt})) as (url, _):
        ref, _ = _complete(url, PROMPT, 8)
    with serving(manifest_for(d, kv_transfer={"codec": "kvtc", "level": 0, **kt})) as (url, _):
        got, lines = _complete(url, PROMPT, 8)
    text = "\n".join(lines)
    # every chunk of the transfer went through kvtc:0, and the bytes that crossed are kvtc's
    assert _counter(text, "splitserve_kv_transfer_chunks_total", 'codec="kvtc:0"') >= 1, text
    assert _counter(text, "splitserve_kv_transfer_chunks_total") == \
        _counter(text, "splitserve_kv_transfer_chunks_total", 'codec="kvtc:0"')
    raw = _counter(text, "splitserve_kv_transfer_raw_bytes_total")
    sent = _counter(text, "splitserve_kv_transfer_bytes_total")
    assert 0 < sent < 0.6 * raw, (sent, raw)
    # kvtc's finest level: the greedy answer is the raw-KV answer (its first token comes from
    # the prefill worker's exact KV, the rest from the decode worker's decoded KV)
    assert got == ref, (got, ref)


def test_adaptive_kvtc_offers_only_levels_within_the_floor(ray_session, kvtc_model):
    from prefill_workers.worker import PrefillWorker

    d, cal = kvtc_model
    costs = cal.costs()
    kv = sorted(c for lb, c in costs.items() if lb.startswith("kvtc:"))
    floor = min(10.0, kv[len(kv) // 2])  # a floor some kvtc levels meet (and, unless costs tie, some do not)
    manifest = manifest_for(d, kv_transfer={"codec": "adaptive", "adaptive_lossy": "kvtc",
                                            "max_quality_loss": floor})
    actor = ray.remote(PrefillWorker).options(num_cpus=1, max_concurrency=100).remote(
        "prefill-kvtc-adaptive", manifest.model_dump_json(), "prefill")
    try:
        ray.get(actor.start.remote(), timeout=300)
        policy = ray.get(actor.kv_policy.remote(), timeout=30)
    finally:
        ray.kill(actor)
    labels = {o["label"] for o in policy["options"]}
    kvtc_in = {lb for lb in labels if lb.startswith("kvtc:")}
    want = {lb for lb, c in costs.items() if lb.startswith("kvtc:") and c <= floor}
    assert kvtc_in == want and want, (labels, costs, floor)
    assert {"none", "lossless", "int8"} <= labels


@pytest.mark.slow
def test_smollm2_answers_through_kvtc(ray_session, smollm2_dir):
    """The real model with its cached calibration, kvtc at the strongest level within the
    default 1% floor: the factual answer survives."""
    from kvtransfer.codecs.kvtc import load_or_calibrate

    load_or_calibrate(smollm2_dir)  # cached beside the model (computed once if missing)
    m = manifest_for(smollm2_dir, kv_transfer={"codec": "kvtc", "transport": "grpc"})
    with serving(m) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": (
            "What is the capital of France? Answer in one word.")}], max_tokens=8, temperature=0)
        text = "\n".join(httpx.get(f"{url}/metrics", timeout=10).text.splitlines())
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert _counter(text, "splitserve_kv_transfer_chunks_total", 'codec="kvtc:') >= 1, text
