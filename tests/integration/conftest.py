"""Integration fixtures: one local Ray for the whole session (loopback only), tiny models
built once, and helpers to deploy a manifest and serve it over real HTTP."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cluster  # noqa: F401 - Ray environment
import ray

from models.builtin import builtin_model_dir
from cluster.manifest import parse_manifest
from cluster.serve import Server, deploy

_names = itertools.count()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    # More logical CPUs than cores: workers are small and pinned to one torch thread.
    # address="local": always a new cluster, never one another process on this machine runs.
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=16, namespace="splitserve-tests",
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def llama_dir() -> Path:
    return builtin_model_dir("tiny-llama")


@pytest.fixture(scope="session")
def mixtral_dir() -> Path:
    return builtin_model_dir("tiny-mixtral")


def manifest_for(model_dir: Path, mode: str = "disaggregated", tp: int = 1, **overrides: object):
    pools: dict[str, dict[str, object]]
    common = {"tp": tp, "num_cpus": 1, "num_kv_blocks": 256, "max_num_batched_tokens": 256}
    if mode == "disaggregated":
        pools = {"prefill": dict(common), "decode": dict(common)}
    else:
        pools = {"colocated": dict(common)}
    data: dict[str, object] = {
        "name": f"test-{next(_names)}",
        "model": {"path": str(model_dir), "name": "tiny"},
        "mode": mode,
        "pools": pools,
        "kv_cache": {"block_size": 8},
        # TTFT admission off: tests that fire bursts at a loaded machine want answers, not
        # 429s (tests/integration/test_overload.py turns it on).
        "server": {"request_timeout_s": 60, "token_timeout_s": 20, "health_check_period_s": 0.5,
                   "ttft_admission": False},
    }
    for key, value in overrides.items():
        data[key] = value
    return parse_manifest(data)


@contextlib.contextmanager
def serving(manifest) -> Iterator[tuple[str, object]]:
    """Deploy a manifest and serve it on a free loopback port; yields (base url, deployment)."""
    dep = deploy(manifest, timeout_s=300)
    server = Server(dep)
    try:
        url = server.start()
        wait_healthy(url)
        yield url, dep
    finally:
        server.stop()
        dep.stop()


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy within {timeout_s}s")


def start_serve_cli(manifest: str, port: int, root: Path, timeout_s: float = 240.0):  # type: ignore[no-untyped-def]
    """`splitserve serve MANIFEST` in a subprocess joined to this session's Ray; returns the
    process once it printed "ready" (fails with its last output if it did not in time)."""
    import os
    import queue
    import subprocess
    import sys
    import threading

    import ray as _ray

    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "serve", manifest, "--port", str(port),
         "--address", _ray.get_runtime_context().gcs_address],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                break
            continue
        seen.append(line)
        if "ready" in line:
            return proc
    proc.kill()
    proc.wait(timeout=30)
    raise AssertionError(f"`serve {manifest}` printed no 'ready' within {timeout_s:.0f} s:\n" + "".join(seen[-30:]))


def stream_killing(client, greedy: dict, kill, after: int = 5) -> str:  # type: ignore[no-untyped-def]
    """Stream ``greedy`` (kwargs of completions.create, temperature 0), call ``kill()`` once
    ``after`` chunks have arrived, and return the whole streamed text; asserts the stream
    went on past the kill and equals the same request unfaulted (asked first)."""
    want = client.completions.create(**greedy).choices[0].text
    got, text = 0, []
    for chunk in client.completions.create(stream=True, **greedy):
        text.append(chunk.choices[0].text)
        got += 1
        if got == after:
            kill()
    assert got > after and "".join(text) == want, (got, "".join(text), want)
    return want
