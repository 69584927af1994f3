"""`splitserve deploy` / `down` against a Ray head started on loopback with the ray CLI (as
`ray up` leaves one), and their one-line errors (exit 2) for bad input."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ray_head(num_cpus: int = 4, port: int | None = None, extra_args: tuple[str, ...] = (),
             env: dict[str, str] | None = None, prefix: str = "ssr-") -> Iterator[str]:
    """A Ray head of its own (own port and temp dir) on 127.0.0.1; `--block` so that ending
    this one process stops exactly its Ray, never another on the machine."""
    port = port or free_port()
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={tmp}", *extra_args],
                            env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "ray head did not start"
            time.sleep(0.5)
        time.sleep(3)  # the raylet registers after the GCS listens
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        time.sleep(2)
        stop_leftovers(tmp)


def stop_leftovers(tmp: str) -> None:
    """Processes of this test's own Ray (their command lines name its unique temp dir) that
    outlived `ray start --block` (e.g. a log monitor), ended by pid."""
    import signal

    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if tmp.encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGTERM)


def cluster_yaml(tmp_path: Path, **provider: object) -> Path:
    data = yaml.safe_load((ROOT / "deploy/clusters/local.yaml").read_text())
    data["provider"].update({"head_ip": "127.0.0.1", "worker_ips": []})
    data["provider"].update(provider)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_input_is_one_line_exit_2(tmp_path) -> None:
    manifest = str(ROOT / "deploy/manifests/demo-autoscale.yaml")
    bad = yaml.safe_load((ROOT / "deploy/clusters/local.yaml").read_text())
    bad["max_workers"] = "many"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = cli("deploy", "--cluster", str(tmp_path / "bad.yaml"), "--manifest", manifest, "--no-up")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "bad.yaml: max_workers:" in lines[0], r.stderr
    r = cli("deploy", "--cluster", str(cluster_yaml(tmp_path)), "--manifest", manifest, "--no-up",
            "--address", f"127.0.0.1:{free_port()}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot reach the Ray head at 127.0.0.1:" in lines[0], r.stderr
    r = cli("down", "--cluster", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml: no such cluster YAML" in r.stderr


@pytest.mark.timeout(1200)
def test_deploy_serve_and_down_on_a_local_head(tmp_path) -> None:
    cluster = cluster_yaml(tmp_path)
    port = free_port()
    with ray_head(num_cpus=4) as address:
        # A manifest whose pools cannot fit the cluster's 4 CPUs.
        big = yaml.safe_load((ROOT / "deploy/manifests/demo-autoscale.yaml").read_text())
        big["name"] = "too-big"
        for pool in big["pools"].values():
            pool["num_cpus"] = 3
            pool.pop("autoscaling")
        (tmp_path / "big.yaml").write_text(yaml.safe_dump(big))
        r = cli("deploy", "--cluster", str(cluster), "--manifest", str(tmp_path / "big.yaml"), "--no-up",
                "--address", address)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
        assert "big.yaml: pools: need 6 CPU" in lines[0] and "offers at most 4 CPU" in lines[0], lines

        r = cli("deploy", "--cluster", str(cluster), "--manifest", "deploy/manifests/demo-autoscale.yaml", "--no-up",
                "--address", address, "--port", str(port), "--timeout", "600")
        assert r.returncode == 0, r.stdout + r.stderr
        url = r.stdout.strip().splitlines()[-1]
        assert url == f"http://127.0.0.1:{port}", r.stdout
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0)
            out = client.completions.create(model="demo", prompt="hello there", max_tokens=6, temperature=0)
            assert out.usage is not None and out.usage.completion_tokens >= 1
            # A second deploy of the same name is refused, naming what to do instead.
            r2 = cli("deploy", "--cluster", str(cluster), "--manifest", "deploy/manifests/demo-autoscale.yaml",
                     "--no-up", "--address", address, "--port", str(free_port()))
            assert r2.returncode == 2 and "already runs" in r2.stderr, r2.stderr
        finally:
            r = cli("down", "--cluster", str(cluster), "--address", address)
        assert r.returncode == 0 and "stopped: demo-autoscale" in r.stdout, r.stdout + r.stderr
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=5)
