"""`splitserve serve` as operators run it: prints ready, answers the openai client
(completions and chat, streaming and not), and Ctrl-C stops every actor it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import ray

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_nodes_are_on_loopback(ray_session):
    ips = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    assert ips and all(ip.startswith("127.") for ip in ips), ips


def test_serve_cli_end_to_end(ray_session, llama_dir):
    port = free_port()
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "serve", "deploy/manifests/demo.yaml", "--port", str(port),
         "--address", address],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "ready" in line:
                break
        assert any("ready" in x for x in lines), "".join(lines[-30:])

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60,
                               max_retries=0)
        r = client.completions.create(model="demo", prompt="def main(", max_tokens=8)
        assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 8
        # Streamed greedy text is the non-streamed greedy text, token for token.
        greedy = {"model": "demo", "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
        whole = client.completions.create(prompt="class A:", **greedy)
        assert whole.usage.completion_tokens == 8 and whole.choices[0].text
        chunks = list(client.completions.create(prompt="class A:", stream=True,
                                                stream_options={"include_usage": True}, **greedy))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        msgs = [{"role": "user", "content": "hi"}]
        c = client.chat.completions.create(messages=msgs, **greedy)
        assert c.choices[0].message.content and c.usage.completion_tokens == 8
        assert c.usage.total_tokens == c.usage.prompt_tokens + 8
        chunks = list(client.chat.completions.create(messages=msgs, stream=True,
                                                     stream_options={"include_usage": True}, **greedy))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

        controller = ray.get_actor("splitserve-controller-demo", namespace="splitserve")
        state = ray.get(controller.get_state.remote(), timeout=10)
        handles = [w["handle"] for ws in state["pools"].values() for w in ws]
        assert len(handles) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # Every actor the server started is gone.
    for h in handles + [controller]:
        try:
            ray.get(h.__ray_ready__.remote(), timeout=10)
            alive = True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            alive = False
        assert not alive
