"""The KV gRPC servers of a deployment answer only its workers: the controller generates a
token at start and gives it to every worker; served requests move their KV over gRPC as
before, and a fetch without the token (this test process has none) is refused and logged."""

from __future__ import annotations

import os

import httpx
import pytest
import ray

from kvtransfer import grpc_transport as gt
from kvtransfer.connector import KVTransferError

from .conftest import manifest_for, serving


def test_unauthenticated_kv_fetch_is_refused(ray_session, llama_dir):
    assert not os.environ.get(gt.TOKEN_ENV)
    m = manifest_for(llama_dir, kv_transfer={"transport": "grpc", "codec": "none"})
    body = {"model": "tiny", "prompt": "def f(x): return x", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with serving(m) as (url, dep):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        state = ray.get(dep.controller.get_state.remote(), timeout=10)
        prefill = state["pools"]["prefill"][0]
        stats = ray.get(prefill["handle"].health.remote(), timeout=30)
        assert stats["kv_server_authenticated"] and stats["kv_fetch_refused"] == 0
        with pytest.raises(KVTransferError, match="UNAUTHENTICATED"):
            gt.fetch(stats["kv_server"], "req-anything", 5)
        with pytest.raises(KVTransferError, match="UNAUTHENTICATED"):
            gt.fetch(stats["kv_server"], "req-anything", 5, token="guess")
        assert ray.get(prefill["handle"].health.remote(), timeout=30)["kv_fetch_refused"] == 2
        # The workers still authenticate each other.
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200


def test_kv_over_tls_serves_and_refuses_plaintext(ray_session, llama_dir, tmp_path):
    """kv_transfer.tls_cert_file/tls_key_file: the workers move KV over TLS (requests served
    as before); a plaintext fetch, even naming a request, gets nothing."""
    import subprocess

    cert, key = tmp_path / "kv.pem", tmp_path / "kv.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", f"/CN={gt.TLS_NAME}", "-addext", f"subjectAltName=DNS:{gt.TLS_NAME}"],
                   check=True, capture_output=True, timeout=60)
    m = manifest_for(llama_dir, kv_transfer={"transport": "grpc", "codec": "none", "tls_cert_file": str(cert),
                                             "tls_key_file": str(key)})
    body = {"model": "tiny", "prompt": "def g(y): return y", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with serving(m) as (url, dep):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
        prefill = ray.get(dep.controller.get_state.remote(), timeout=10)["pools"]["prefill"][0]
        stats = ray.get(prefill["handle"].health.remote(), timeout=30)
        assert stats["kv_server_tls"] and stats["kv_server_authenticated"]
        with pytest.raises(KVTransferError):
            gt.fetch(stats["kv_server"], "req-anything", 5)
