"""An expert worker SIGKILLed mid-stream: the streams that used it end with an error
within 10 s (never hang), the controller replaces it with the same experts, and later
requests succeed with the right tokens."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest
import ray

from .conftest import stream_killing, wait_healthy
from .test_afd_serving import afd_manifest
from .conftest import serving
from .test_failures import workers


def test_expert_sigkill_mid_stream(ray_session, mixtral_dir):
    with serving(afd_manifest(mixtral_dir)) as (url, dep):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=60, max_retries=0)
        kw = dict(model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=8, temperature=0,
                  extra_body={"return_token_ids": True})
        before = client.completions.create(**kw).choices[0].model_extra["token_ids"]
        victim = workers(dep, "expert")[1]
        pid, experts = victim["stats"]["pid"], victim["stats"]["experts"]
        # Two concurrent long streams; the expert worker dies after the 5th chunk of one.
        errors: list[BaseException] = []
        ended: list[float] = []

        def other() -> None:
            try:
                for _ in client.completions.create(model="tiny", prompt="def f(", max_tokens=1500, stream=True,
                                                   extra_body={"ignore_eos": True}):
                    pass
            except openai.APIError as e:
                errors.append(e)
            ended.append(time.monotonic())

        t = threading.Thread(target=other, daemon=True)
        t.start()
        stream = client.completions.create(model="tiny", prompt="import os", max_tokens=1500, stream=True,
                                           extra_body={"ignore_eos": True})
        got = 0
        t_kill = None
        with pytest.raises(openai.APIError) as err:
            for _chunk in stream:
                got += 1
                if got == 5:
                    os.kill(pid, signal.SIGKILL)
                    t_kill = time.monotonic()
        assert t_kill is not None and time.monotonic() - t_kill < 10
        assert "expert shard" in str(err.value), err.value
        t.join(timeout=15)
        assert not t.is_alive() and len(errors) == 1 and ended[0] - t_kill < 10
        shard = victim["stats"]["shard"]
        deadline = time.monotonic() + 90
        while True:
            new = [w for w in workers(dep, "expert") if w["healthy"] and w["stats"].get("shard") == shard
                   and w["worker_id"] != victim["worker_id"]]
            if new or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert new, "expert worker not replaced within 90 s"
        assert new[0]["stats"]["experts"] == experts and new[0]["stats"]["pid"] != pid
        wait_healthy(url, timeout_s=120)  # a loaded machine starts actors slowly
        deadline = time.monotonic() + 30
        while True:  # the attention worker learns the new address from the controller
            try:
                after = client.completions.create(**kw).choices[0].model_extra["token_ids"]
                break
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert after == before
        assert ray.get(dep.controller.get_state.remote())["replacements"] >= 1


def test_attention_worker_death_mid_stream(ray_session, mixtral_dir):
    """An attention worker dies like a decode worker: the controller replaces it, the new one
    reaches the expert workers, and the stream resumes there from the prompt and the tokens
    it had sent (issue 16's re-routing), ending with the unfaulted greedy text."""
    with serving(afd_manifest(mixtral_dir)) as (url, dep):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=120, max_retries=0)
        greedy = {"model": "tiny", "prompt": "import os", "max_tokens": 300, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}
        victim = workers(dep, "attention")[0]
        want = stream_killing(client, greedy, lambda: ray.kill(victim["handle"], no_restart=True))
        deadline = time.monotonic() + 90
        while not [w for w in workers(dep, "attention") if w["healthy"] and w["worker_id"] != victim["worker_id"]]:
            assert time.monotonic() < deadline, "attention worker not replaced within 90 s"
            time.sleep(0.2)
        wait_healthy(url, timeout_s=120)  # a loaded machine starts actors slowly
        r = client.completions.create(**greedy)
        assert r.choices[0].text == want
