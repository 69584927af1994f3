"""`splitserve serve` as operators run it, on the demo manifest (the real built-in model,
1 prefill + 1 decode): prints ready, answers the openai client (completions and chat,
streaming and not) with transformers' greedy answers, and Ctrl-C stops every actor it
started."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import openai
import ray

from engine.tokenizer import Tokenizer

from ..real_model import CHAT_MAX_NEW, CONVERSATIONS, hf_chat_greedy
from .conftest import start_serve_cli

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_nodes_are_on_loopback(ray_session):
    ips = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    assert ips and all(ip.startswith("127.") for ip in ips), ips


def test_serve_cli_end_to_end(ray_session, smollm2_dir):
    port = free_port()
    proc = start_serve_cli("deploy/manifests/demo.yaml", port, ROOT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120,
                               max_retries=0)
        r = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
        assert r.usage.prompt_tokens == 5 and 1 <= r.usage.completion_tokens <= 8
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="demo", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
        assert streamed == r.choices[0].text and "Paris" in streamed
        # The real model answers as transformers does, and stops at its end of turn.
        tok = Tokenizer.from_dir(smollm2_dir)
        for i, conv in enumerate(CONVERSATIONS):
            prompt_ids, want = hf_chat_greedy(str(smollm2_dir), i)
            c = client.chat.completions.create(model="demo", messages=conv, max_tokens=CHAT_MAX_NEW, temperature=0)
            assert c.usage.prompt_tokens == len(prompt_ids)
            assert c.choices[0].message.content == tok.decode(want), conv
            assert c.choices[0].finish_reason == ("stop" if want[-1] == 2 else "length")
            assert c.usage.completion_tokens == len(want)
        chunks = list(client.chat.completions.create(
            model="demo", messages=CONVERSATIONS[0], max_tokens=CHAT_MAX_NEW, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            tok.decode(hf_chat_greedy(str(smollm2_dir), 0)[1])
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

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
