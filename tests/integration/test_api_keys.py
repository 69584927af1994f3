"""Ingress API keys: with SPLITSERVE_API_KEY in the server's environment, or a keys file
named in the manifest, every endpoint but /health wants `Authorization: Bearer <key>`;
otherwise 401 with an OpenAI error object. Tested with the openai client over real HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from cluster.errors import ManifestError
from cluster.http_guard import ENV_KEY

from .conftest import manifest_for, serving

BODY = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 3, "temperature": 0}


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=60, max_retries=0)


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "invalid_api_key" and "Authorization: Bearer" in err["message"]


def test_env_key_guards_every_endpoint_but_health(ray_session, llama_dir, monkeypatch):
    monkeypatch.setenv(ENV_KEY, "sk-test-env-key")
    with serving(manifest_for(llama_dir)) as (url, _dep):
        # The openai client: the right key works, a wrong one is an AuthenticationError.
        ok = _client(url, "sk-test-env-key")
        assert ok.completions.create(**BODY).usage.completion_tokens == 3
        assert [m.id for m in ok.models.list().data] == ["tiny"]
        with pytest.raises(openai.AuthenticationError) as err:
            _client(url, "sk-wrong").completions.create(**BODY)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(url, "sk-wrong").chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            _client(url, "sk-wrong").models.list()
        # Raw HTTP: no header, another scheme, an empty token, a key's prefix.
        for headers in ({}, {"Authorization": "Basic sk-test-env-key"}, {"Authorization": "Bearer"},
                        {"Authorization": "Bearer sk-test-env"}):
            _refused(httpx.post(f"{url}/v1/completions", json=BODY, headers=headers, timeout=30))
        _refused(httpx.get(f"{url}/metrics", timeout=30))
        _refused(httpx.get(f"{url}/v1/models", timeout=30))
        # Refused before the body is looked at: a bad body without a key is a 401, not a 400.
        _refused(httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30))
        # /health stays open; /metrics answers with the key.
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        m = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sk-test-env-key"}, timeout=30)
        assert m.status_code == 200 and "splitserve_requests_total" in m.text


def test_keys_file_in_the_manifest(ray_session, llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    (tmp_path / "keys.txt").write_text("# operators\nsk-alice\n\nsk-bob  # on-call\n")
    m = manifest_for(llama_dir, server={"request_timeout_s": 60, "token_timeout_s": 20,
                                        "health_check_period_s": 0.5, "api_keys_file": str(tmp_path / "keys.txt")})
    with serving(m) as (url, _dep):
        for key in ("sk-alice", "sk-bob"):
            assert _client(url, key).completions.create(**BODY).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            _client(url, "sk-carol").completions.create(**BODY)
        with pytest.raises(openai.AuthenticationError):
            _client(url, "# operators").completions.create(**BODY)


def test_without_keys_nothing_is_asked(ray_session, llama_dir, monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    with serving(manifest_for(llama_dir)) as (url, _dep):
        assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).status_code == 200


def test_a_missing_or_empty_keys_file_is_a_manifest_error(llama_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    for name, words in (("absent.txt", "does not exist"), ("empty.txt", "holds no key")):
        with pytest.raises(ManifestError) as err:
            manifest_for(llama_dir, server={"api_keys_file": str(tmp_path / name)})
        (path, reason), = err.value.problems
        assert path == "server.api_keys_file" and words in reason
