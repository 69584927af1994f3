"""Autoscaling on Ray's fake multi-node autoscaler (provider fake_multinode): the decode
pool's scale-up brings up a new (fake) node, and after the load the node goes away.
Long (node start, idle timeout): marked slow."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .test_deploy import ENV, free_port, ray_head

ROOT = Path(__file__).resolve().parents[2]


def fake_cluster_config(port: int) -> dict:
    return {
        "cluster_name": "splitserve-fake", "max_workers": 2, "idle_timeout_minutes": 0.5, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}"},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@contextlib.contextmanager
def fake_head(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    cfg = tmp_path / "fake.yaml"
    cfg.write_text(yaml.safe_dump(fake_cluster_config(port)))
    with ray_head(2, port, (f"--autoscaling-config={cfg}",), {**ENV, "RAY_FAKE_CLUSTER": "1"}, "ssf-") as address:
        yield address


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scale_up_brings_up_a_fake_node_and_it_goes_after(tmp_path) -> None:
    with fake_head(tmp_path) as address:
        r = subprocess.run([sys.executable, str(ROOT / "tests/integration/fake_autoscale_check.py"), address],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["decode_replicas_up"] == 2, out
    assert len(out["nodes_up"]) == len(out["nodes_before"]) + 1, out  # the new fake node
    assert out["failed"] == 0 and out["sent"] >= 1, out
    assert out["decode_replicas_down"] == 1, out
    assert len(out["nodes_after"]) == len(out["nodes_before"]), out  # and it went away


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_deploy_and_down_on_the_fake_autoscaling_cluster(tmp_path) -> None:
    from .test_deploy import cli

    port = free_port()
    with fake_head(tmp_path) as address:
        cfg = tmp_path / "fake.yaml"
        r = cli("deploy", "--cluster", str(cfg), "--manifest", "deploy/manifests/demo-autoscale.yaml", "--no-up",
                "--address", address, "--port", str(port), "--timeout", "600")
        assert r.returncode == 0, r.stdout + r.stderr
        url = r.stdout.strip().splitlines()[-1]
        try:
            import openai

            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0)
            out = client.completions.create(model="demo", prompt="hello", max_tokens=4, temperature=0)
            assert out.usage is not None and out.usage.completion_tokens >= 1
        finally:
            r = cli("down", "--cluster", str(cfg), "--address", address)
        assert r.returncode == 0 and "stopped: demo-autoscale" in r.stdout, r.stdout + r.stderr
