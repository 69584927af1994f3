"""Attention/expert disaggregation served on Ray: prefill, attention and expert pools;
greedy output of 16 concurrent mixed-length requests (streamed and not, through the
openai client) equals the engine alone and transformers, with micro_batches 1 and 2,
1 and 2 attention workers, 2 and 3 expert workers and a placement from a file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from .conftest import manifest_for, serving
from .test_serving_equivalence import engine_alone, prompts, reference, served


def afd_manifest(model_dir: Path, attention: int = 1, experts: int = 2, micro_batches: int = 2,
                 placement: str | None = None):
    common = {"num_cpus": 1, "num_kv_blocks": 256, "max_num_batched_tokens": 256}
    expert: dict[str, object] = {"replicas": experts, "num_cpus": 0.5, "micro_batches": micro_batches}
    if placement is not None:
        expert["placement"] = placement
    return manifest_for(model_dir, pools={"prefill": dict(common), "attention": {**common, "replicas": attention},
                                          "expert": expert})


@pytest.fixture(scope="module")
def expected(mixtral_dir):
    vocab = json.loads((mixtral_dir / "config.json").read_text())["vocab_size"]
    ps = prompts(vocab)
    ref = reference(mixtral_dir, ps)
    assert engine_alone(mixtral_dir, ps) == ref
    return ps, ref


@pytest.mark.parametrize("attention,experts,micro_batches", [(1, 2, 2), (2, 3, 1)])
def test_afd_serving_equals_transformers(ray_session, mixtral_dir, expected, attention, experts, micro_batches):
    ps, ref = expected
    with serving(afd_manifest(mixtral_dir, attention, experts, micro_batches)) as (url, dep):
        got = asyncio.run(served(url, ps))
        assert got == ref
        state = dep.ingress.router.pools
        assert len(state["attention"]) == attention and len(state["expert"]) == experts
        import ray

        pools = ray.get(dep.controller.get_state.remote())["pools"]
        # Every expert worker computed rows; the attention workers routed them all.
        expert_stats = [ray.get(w["handle"].health.remote()) for w in pools["expert"]]
        assert all(s["rows"] > 0 for s in expert_stats)
        # One node: the payloads went through shared memory (the socket rang the bell).
        assert all(s["shm_connections"] >= 1 for s in expert_stats)
        att = [ray.get(w["handle"].health.remote()) for w in pools["attention"]]
        routed = sum(sum(map(sum, s["expert_load"])) for s in att)
        # (an attention worker the router gave no request has opened no connection)
        assert all(s["expert_shards_shm"] for s in att if sum(map(sum, s["expert_load"])))
        assert routed == sum(s["rows"] for s in expert_stats)
        # /metrics shows the expert load per worker once the ingress has the new stats.
        import time

        import httpx

        deadline = time.monotonic() + 20
        while True:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            rows = [ln for ln in text.splitlines() if ln.startswith("splitserve_expert_rows{")]
            routed_m = [ln for ln in text.splitlines() if ln.startswith("splitserve_expert_routed_tokens{")]
            total = sum(float(ln.rsplit(" ", 1)[1]) for ln in rows)
            total_routed = sum(float(ln.rsplit(" ", 1)[1]) for ln in routed_m)
            # The expert and attention workers' stats reach the ingress in separate polls.
            if (total, total_routed) == (routed, routed) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert total == routed and total_routed == routed
        assert any('pool="expert"' in ln for ln in rows) and all('pool="attention"' in ln for ln in routed_m)


def test_afd_serving_with_placement_from_place_experts(ray_session, mixtral_dir, expected, tmp_path):
    """A routing trace recorded by the attention side, `splitserve place-experts` (the
    ILP) on it for 3 expert workers with room for replicas, then serving that placement."""
    import subprocess
    import sys

    import numpy as np

    from engine.afd import local_afd_runner
    from engine.experts import even_placement
    from engine.config import ModelConfig
    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    from .test_cli_serve import ROOT

    ps, ref = expected
    cfg = ModelConfig.from_dir(mixtral_dir)
    runner = local_afd_runner(str(mixtral_dir), "float32", 128, 8,
                              even_placement(cfg.num_hidden_layers, cfg.num_local_experts, 2), micro_batches=2)
    runner.trace = []
    LLMEngine(runner, SchedulerConfig(max_num_batched_tokens=64, max_model_len=4096), 128,
              eos_token_ids=cfg.eos_token_ids).generate(ps, SamplingParams(temperature=0, max_tokens=12))
    trace = runner.routing_trace()
    assert trace.shape[1:] == (cfg.num_hidden_layers, cfg.num_experts_per_tok) and trace.shape[0] > 100
    np.save(tmp_path / "trace.npy", trace.numpy().astype(np.int32))
    out = tmp_path / "placement.json"
    r = subprocess.run([sys.executable, "-m", "cluster", "place-experts", "--trace", str(tmp_path / "trace.npy"),
                        "--gpus", "3", "--gpus-per-node", "3", "--slots", "4", "--experts", "8",
                        "--time-limit", "20", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    layers = json.loads(out.read_text())["layers"]
    assert len(layers) == cfg.num_hidden_layers and all(len(layer) == 3 for layer in layers)
    with serving(afd_manifest(mixtral_dir, experts=3, placement=str(out))) as (url, _):
        assert asyncio.run(served(url, ps)) == ref


def test_serve_cli_demo_afd(ray_session, mixtral_dir):
    """`splitserve serve deploy/manifests/demo-afd.yaml` as an operator runs it: the openai
    client, streaming and not; greedy tokens equal the engine alone; one actor per worker,
    class names naming their roles; Ctrl-C stops them."""
    import signal
    import subprocess

    import openai
    import ray

    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    from .conftest import start_serve_cli
    from .test_cli_serve import ROOT, free_port

    port = free_port()
    proc = start_serve_cli("deploy/manifests/demo-afd.yaml", port, ROOT)
    handles: list = []
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60, max_retries=0)
        ps = [[11, 12, 13, 14, 15, 16, 17], [40, 41, 42]]
        eng = LLMEngine.from_model_dir(mixtral_dir, num_blocks=64, block_size=16,
                                       scheduler_config=SchedulerConfig(max_model_len=4096))
        want = eng.generate(ps, SamplingParams(temperature=0, max_tokens=8))
        r = client.completions.create(model="demo-afd", prompt=ps[0], max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == want[0]
        ids: list[int] = []
        for chunk in client.completions.create(model="demo-afd", prompt=ps[1], max_tokens=8, temperature=0,
                                               stream=True, extra_body={"return_token_ids": True}):
            ids += chunk.choices[0].model_extra.get("token_ids") or []
        assert ids == want[1]
        chunks = list(client.chat.completions.create(model="demo-afd", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=6, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        controller = ray.get_actor("splitserve-controller-demo-afd", namespace="splitserve")
        state = ray.get(controller.get_state.remote(), timeout=10)
        names = {pool: sorted(w["handle"]._ray_actor_creation_function_descriptor.class_name for w in ws)
                 for pool, ws in state["pools"].items()}
        assert names == {"prefill": ["PrefillWorker"], "attention": ["AttentionWorker"],
                         "expert": ["ExpertWorker", "ExpertWorker"]}
        handles = [w["handle"] for ws in state["pools"].values() for w in ws] + [controller]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    for h in handles:
        try:
            ray.get(h.__ray_ready__.remote(), timeout=10)
            alive = True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            alive = False
        assert not alive


def test_live_replacement_under_load(ray_session, mixtral_dir, expected):
    """A new expert placement applied while 16 requests decode: every request succeeds
    with the reference tokens, the experts change homes, and a replaced expert worker
    would load the new placement (the controller's manifest carries it)."""
    import ray

    ps, ref = expected
    with serving(afd_manifest(mixtral_dir)) as (url, dep):
        layers = [[[4, 5, 6, 7, 0], [0, 1, 2, 3]] for _ in range(4)]

        async def run() -> tuple[list[list[int]], dict]:
            load = asyncio.ensure_future(served(url, ps))
            await asyncio.sleep(0.3)  # requests are in flight
            summary = await dep.controller.apply_expert_placement.remote(layers)
            return await load, summary

        got, summary = asyncio.run(run())
        assert got == ref  # 0 failed requests, same tokens
        assert summary == {"loaded": 32, "dropped": 28, "expert_workers": 2, "attention_workers": 1}
        pools = ray.get(dep.controller.get_state.remote())["pools"]
        homes = {ray.get(w["handle"].health.remote())["shard"]: ray.get(w["handle"].health.remote())["experts"]
                 for w in pools["expert"]}
        assert homes == {0: [[0, 4, 5, 6, 7]] * 4, 1: [[0, 1, 2, 3]] * 4}
        # Later requests route by the new placement and still give the reference tokens.
        assert asyncio.run(served(url, ps[:4])) == ref[:4]
        w0 = next(w for w in pools["expert"] if w["stats"]["shard"] == 0)
        rows0 = {(layer, e): n for layer, e, n in ray.get(w0["handle"].health.remote())["expert_rows"]}
        assert any(rows0.get((0, e), 0) > 0 for e in (4, 5, 6, 7))
        # A bad placement is refused with the manifest's field path, nothing changes.
        with pytest.raises(Exception, match="pools.expert.placement"):
            ray.get(dep.controller.apply_expert_placement.remote([[[0, 1], [2, 3]]] * 4))


def _routed_any(text: str) -> bool:
    from cluster.expert_stats import ExpertStatsError, parse_expert_loads

    try:
        return int(parse_expert_loads(text)[0].sum()) > 0
    except ExpertStatsError:
        return False


def test_replacement_from_metrics_applied_with_splitserve_apply(ray_session, mixtral_dir, expected, tmp_path):
    """The operator's path: `splitserve place-experts --from URL` reads the live expert
    load from the server's /metrics and writes a placement; `splitserve apply` of the
    manifest now naming that file re-places the experts live while 16 requests decode:
    0 failed (reference tokens), no new workers, the experts' homes are the file's."""
    import time

    import httpx
    import ray

    from cluster.cli import main as cli
    from cluster.ops import apply_manifest, inline_expert_placement
    from engine.experts import even_placement, shard_experts

    ps, ref = expected
    m = afd_manifest(mixtral_dir)
    with serving(m) as (url, dep):
        assert asyncio.run(served(url, ps)) == ref  # traffic: the attention worker counts its routing
        deadline = time.monotonic() + 30
        while not _routed_any(httpx.get(f"{url}/metrics", timeout=10).text):
            # The controller's health poll brings the attention workers' counts in.
            assert time.monotonic() < deadline, "no routed expert load on /metrics"
            time.sleep(0.3)
        out = tmp_path / "placement.json"
        # No --gpus: the server's expert pool size (2).
        assert cli(["place-experts", "--from", url, "--gpus-per-node", "2", "--slots", "5", "--experts", "8",
                    "--time-limit", "20", "--out", str(out)]) == 0
        layers = json.loads(out.read_text())["layers"]
        assert len(layers) == 4 and all(len(layer) == 2 for layer in layers)
        assert layers != even_placement(4, 8, 2)
        before = {w["worker_id"] for ws in ray.get(dep.controller.get_state.remote())["pools"].values() for w in ws}
        new = m.model_copy(deep=True)
        new.pools["expert"].placement = str(out)
        inline_expert_placement(new)
        assert new.pools["expert"].placement == layers

        async def run() -> tuple[list[list[int]], dict]:
            load = asyncio.ensure_future(served(url, ps))
            await asyncio.sleep(0.3)  # requests are in flight
            res = await asyncio.to_thread(apply_manifest, new, None, "splitserve-tests", 60)
            return await load, res

        got, res = asyncio.run(run())
        assert got == ref  # 0 failed requests, the same tokens
        assert res["ok"] and res["rolled"] == [] and res["experts"]["loaded"] > 0, res
        pools = ray.get(dep.controller.get_state.remote())["pools"]
        assert {w["worker_id"] for ws in pools.values() for w in ws} == before  # no worker replaced
        homes = {}
        for w in pools["expert"]:
            h = ray.get(w["handle"].health.remote())
            homes[h["shard"]] = h["experts"]
        assert homes == {s: shard_experts(layers, s) for s in (0, 1)}
        assert asyncio.run(served(url, ps[:4])) == ref[:4]
        # Applying the same manifest again changes nothing; no running server: exit 2.
        assert apply_manifest(new, None, "splitserve-tests", 60)["experts"] is None
    assert cli(["place-experts", "--from", url, "--gpus-per-node", "2", "--slots", "5", "--out", str(out)]) == 2
