"""`splitserve apply` on a running deployment: a changed SLO and KV codec rolled out under
load with no failed request; fields that need a restart refused (exit 2, one line each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from cluster.ops import apply_manifest

from .conftest import manifest_for, serving
from .test_autoscale import OpenLoop

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "splitserve-tests"  # the ray_session fixture's


def worker_ids(dep, pool: str) -> set[str]:
    return {w["worker_id"] for w in ray.get(dep.controller.get_state.remote(), timeout=10)["pools"][pool]}


@pytest.mark.timeout(900)
def test_apply_slo_and_codec_under_load(ray_session, llama_dir) -> None:
    kt = {"codec": "none", "transport": "grpc"}
    m = manifest_for(llama_dir, kv_transfer=kt)
    with serving(m) as (url, dep):
        before = {p: worker_ids(dep, p) for p in ("prefill", "decode")}
        new = m.model_copy(deep=True)
        new.slo = new.slo.model_copy(update={"ttft_ms": 400.0, "tpot_ms": 50.0})
        new.kv_transfer = new.kv_transfer.model_copy(update={"codec": "int8"})
        prompt = " ".join(f"w{j}" for j in range(60))
        with OpenLoop(url, rate=4.0, prompt=prompt, max_tokens=16, model="tiny") as load:
            res = apply_manifest(new, namespace=NAMESPACE, drain_timeout_s=120)
            sent, errors = load.finish()
        assert res["ok"], res
        assert sorted(res["rolled"]) == ["decode", "prefill"]
        assert {"slo.ttft_ms", "slo.tpot_ms", "kv_transfer.codec"} <= set(res["changed"])
        assert not errors, f"{len(errors)} of {sent} requests failed during the rollout, e.g. {errors[0]!r}"
        assert sent >= 4
        after = {p: worker_ids(dep, p) for p in ("prefill", "decode")}
        for p in before:  # every worker replaced, the pool size kept
            assert len(after[p]) == len(before[p]) and not after[p] & before[p], (before, after)
        running = ray.get(dep.controller.get_manifest.remote(), timeout=10)
        assert '"codec":"int8"' in running.replace(" ", "")
        # The ingress took the new manifest too, and requests go on through the new workers.
        dep.ingress.router.version = -1
        import asyncio

        asyncio.run(dep.ingress.refresh())
        assert dep.ingress.m.slo.ttft_ms == 400.0 and dep.ingress.m.kv_transfer.codec == "int8"
        with OpenLoop(url, rate=4.0, prompt=prompt, max_tokens=8, model="tiny") as more:
            import time

            deadline = time.monotonic() + 120  # until two requests came back through the new workers
            while sum(f.done() for f in more.futures) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            sent2, errors2 = more.finish()
        assert not errors2 and sent2 >= 2


def test_apply_refuses_fields_that_need_a_restart(ray_session, llama_dir, tmp_path) -> None:
    m = manifest_for(llama_dir)
    with serving(m) as (url, dep):
        data = m.model_dump(mode="json")
        data["kv_cache"]["block_size"] = 16
        data["model"]["dtype"] = "bfloat16"
        data["slo"]["ttft_ms"] = 10.0  # allowed, but the whole manifest is refused
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump(data))
        before = worker_ids(dep, "prefill")
        proc = subprocess.run([sys.executable, "-m", "cluster", "apply", str(path), "--address",
                               ray.get_runtime_context().gcs_address, "--namespace", NAMESPACE],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert any("model" in x and "restart" in x for x in lines), lines
        assert any("kv_cache.block_size" in x for x in lines), lines
        assert all(x.startswith(str(path)) for x in lines), lines
        assert worker_ids(dep, "prefill") == before
        assert ray.get(dep.controller.get_state.remote(), timeout=10)["manifest_version"] == 0


@pytest.mark.timeout(900)
def test_apply_rolls_back_when_a_new_worker_fails_to_start(ray_session, llama_dir, tmp_path) -> None:
    """A rollout whose new decode worker cannot start (its KV cache, 10^9 blocks, cannot be
    allocated: a real failure of the worker's start, no injected fault) rolls back to the
    running manifest: the old workers keep serving, the manifest is the old one again, and
    `splitserve apply` exits 2 saying it rolled back."""
    m = manifest_for(llama_dir)
    with serving(m) as (url, dep):
        before = {p: worker_ids(dep, p) for p in ("prefill", "decode")}
        running_before = ray.get(dep.controller.get_manifest.remote(), timeout=10)
        data = m.model_dump(mode="json")
        data["slo"]["ttft_ms"] = 777.0
        data["pools"]["decode"]["num_kv_blocks"] = 10**9
        path = tmp_path / "broken.yaml"
        path.write_text(yaml.safe_dump(data))
        prompt = " ".join(f"w{j}" for j in range(30))
        with OpenLoop(url, rate=3.0, prompt=prompt, max_tokens=8, model="tiny") as load:
            proc = subprocess.run([sys.executable, "-m", "cluster", "apply", str(path), "--address",
                                   ray.get_runtime_context().gcs_address, "--namespace", NAMESPACE],
                                  cwd=ROOT, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            sent, errors = load.finish()
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert any("pools.decode" in x and "failed to start" in x and "rolled back" in x for x in lines), lines
        assert not errors, f"{len(errors)} of {sent} requests failed around the failed rollout, e.g. {errors[0]!r}"
        state = ray.get(dep.controller.get_state.remote(), timeout=10)
        assert state["manifest_version"] == 2  # the rollout's, then the rollback's
        assert ray.get(dep.controller.get_manifest.remote(), timeout=10) == running_before
        # Prefill was rolled (the SLO changed) before decode failed: its new worker is
        # replaced again by one of the old manifest; decode keeps its old worker.
        after = {p: worker_ids(dep, p) for p in ("prefill", "decode")}
        assert after["decode"] == before["decode"], (before, after)
        assert len(after["prefill"]) == len(before["prefill"]), (before, after)
        res = apply_manifest(m, namespace=NAMESPACE)  # the running manifest again: nothing to do
        assert res["ok"] and res["rolled"] == [] and res["changed"] == [], res
