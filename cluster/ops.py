"""The operator's commands against a running deployment (apply; deploy and down later):
connect to its Ray cluster, find its controller, act. Errors are one line (OpsError)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cluster  # noqa: F401 - Ray's environment before ray is imported

from cluster.controller import CONTROLLER_NAME
from cluster.manifest import Manifest


class OpsError(RuntimeError):
    """One line for the operator: what failed, naming the address, file or field."""


def connect(address: str | None, namespace: str) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ... : one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OpsError(f"cannot reach the Ray cluster at {address}: {first}") from None


def controller_of(manifest: Manifest, address: str | None, namespace: str) -> Any:
    import ray

    connect(address, namespace)
    name = f"{CONTROLLER_NAME}-{manifest.name}"
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise OpsError(f"name: no running deployment {manifest.name!r} (actor {name}) in Ray namespace "
                       f"{namespace!r} at {address or os.environ.get('RAY_ADDRESS') or 'auto'}; start it with "
                       "'splitserve serve' or 'splitserve deploy'") from None


def inline_expert_placement(manifest: Manifest) -> None:
    """An expert pool's placement FILE read here and put inline, so that the controller
    (on whichever node) gets the layers themselves; a changed placement is then applied
    live (Controller.apply_expert_placement). OpsError for a file that cannot be read."""
    import json

    pool = manifest.pools.get("expert")  # type: ignore[call-overload]
    if pool is None or not isinstance(pool.placement, str) or pool.placement == "even":
        return
    try:
        data = json.loads(Path(pool.placement).read_text())
    except (OSError, ValueError) as e:
        raise OpsError(f"pools.expert.placement: {pool.placement}: cannot read ({e})") from None
    pool.placement = data["layers"] if isinstance(data, dict) else data


def apply_manifest(manifest: Manifest, address: str | None = None, namespace: str = "splitserve",
                   drain_timeout_s: float | None = None, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Roll the manifest out on the running deployment of its name; returns the
    controller's summary ({"ok": False, "problems": [...]} for fields needing a restart)."""
    import ray

    ctl = controller_of(manifest, address, namespace)
    ref = ctl.apply.remote(manifest.model_dump_json(), drain_timeout_s)
    return ray.get(ref, timeout=timeout_s)  # type: ignore[no-any-return]


# -- deploy / down ----------------------------------------------------------------------------
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What is not shipped to the cluster with the project (runtime_env working_dir).
SHIP_EXCLUDES = [".git", ".venv", "**/__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", "results",
                 "*.safetensors", "*.gguf", "*.npy"]
SERVER_PREFIX = "splitserve-server-"


def load_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """The cluster YAML as `ray up` takes it (provider defaults filled, Ray's schema checked);
    OpsError names the file and the field Ray rejects."""
    import copy

    import jsonschema
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    p = Path(path)
    if not p.is_file():
        raise OpsError(f"{p}: no such cluster YAML")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise OpsError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise OpsError(f"{p}: expected a mapping (a Ray cluster-launcher config)")
    try:
        try:
            prepared = prepare_config(copy.deepcopy(data))
        except FileNotFoundError:
            # A provider whose defaults file this Ray wheel lacks (fake_multinode's
            # example.yaml): the schema check of the file as written still applies.
            prepared = copy.deepcopy(data)
        except Exception:  # noqa: BLE001 - a type error deep in Ray: its schema says where
            validate_config(data)
            raise
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(x) for x in e.absolute_path) or "<root>"
        raise OpsError(f"{p}: {where}: {e.message.splitlines()[0]} (Ray's cluster schema)") from None
    except Exception as e:  # noqa: BLE001 - Ray's own checks raise ValueError etc.
        raise OpsError(f"{p}: rejected by Ray: {' '.join(str(e).split())[:300]}") from None
    return prepared  # type: ignore[no-any-return]


def manifest_needs(m: Manifest) -> tuple[float, float, list[str]]:
    """CPUs and GPUs the manifest's pools need at start (autoscaled pools: min_replicas)."""
    cpus = gpus = 0.0
    parts = []
    for name, pool in m.pools.items():
        n = pool.autoscaling.min_replicas if pool.autoscaling is not None else pool.replicas
        n = max(n, pool.replicas)
        cpus += n * pool.tp * pool.num_cpus
        gpus += n * pool.tp * pool.num_gpus
        parts.append(f"{name} {n} x tp {pool.tp} x ({pool.num_cpus:g} CPU, {pool.num_gpus:g} GPU)")
    return cpus, gpus, parts


def cluster_offers(config: dict[str, Any]) -> tuple[float, float] | None:
    """Most CPUs and GPUs the cluster YAML can bring up (head + max_workers of each node
    type, capped by max_workers); None when a node type does not declare its resources
    (Ray detects them on the machine: checked against the live cluster instead)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if not types or head not in types:
        return None
    if any("CPU" not in (t.get("resources") or {}) for t in types.values()):
        return None
    cpus = float(types[head]["resources"].get("CPU", 0))
    gpus = float(types[head]["resources"].get("GPU", 0))
    budget = int(config.get("max_workers", 0))
    for name, t in sorted(types.items(), key=lambda kv: -float((kv[1].get("resources") or {}).get("CPU", 0))):
        k = min(int(t.get("max_workers", 0)), budget)
        budget -= k
        cpus += k * float(t["resources"].get("CPU", 0))
        gpus += k * float(t["resources"].get("GPU", 0))
    return cpus, gpus


def check_fits(m: Manifest, manifest_path: str, offers: tuple[float, float], where: str) -> None:
    cpus, gpus, parts = manifest_needs(m)
    if cpus > offers[0] + 1e-9 or gpus > offers[1] + 1e-9:
        raise OpsError(f"{manifest_path}: pools: need {cpus:g} CPU and {gpus:g} GPU ({'; '.join(parts)}); "
                       f"{where} offers at most {offers[0]:g} CPU and {offers[1]:g} GPU")


def head_address(cluster_path: str, config: dict[str, Any], address: str | None) -> str:
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    provider = config.get("provider") or {}
    if provider.get("type") == "local" and provider.get("head_ip"):
        return f"{provider['head_ip']}:6379"
    out = subprocess.run(["ray", "get-head-ip", cluster_path], capture_output=True, text=True, timeout=300)
    ip = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode != 0 or not ip:
        raise OpsError(f"{cluster_path}: cannot find the head's address ('ray get-head-ip' failed: "
                       f"{(out.stderr.strip().splitlines() or ['no output'])[-1]}); pass --address")
    return f"{ip}:6379"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A quick TCP check of the head's GCS port, so an unreachable head is one line, not a
    minute of Ray retries."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise OpsError(f"cannot reach the Ray head at {address}: {e}") from None


class ServerProcess:
    """A detached actor on the head node that runs `splitserve serve MANIFEST` (the project
    is its working directory, shipped by runtime_env) and stops it (Ctrl-C) on request."""

    def __init__(self, manifest_rel: str | None, manifest_text: str, host: str | None, port: int) -> None:
        import ray

        if manifest_rel is None or not Path(manifest_rel).is_file():
            d = Path(".splitserve-deploy")
            d.mkdir(exist_ok=True)
            (d / "manifest.yaml").write_text(manifest_text)
            manifest_rel = str(d / "manifest.yaml")
        self.host = host or ray.util.get_node_ip_address()
        self.port = port
        self.log_path = Path(".splitserve-deploy") / "serve.log"
        self.log_path.parent.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd()}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster", "serve", manifest_rel, "--host", self.host, "--port", str(port),
             "--address", ray.get_runtime_context().gcs_address],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, env=env)

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def status(self) -> dict[str, Any]:
        tail = self.log_path.read_text(errors="replace").splitlines()[-20:] if self.log_path.exists() else []
        return {"url": self.url(), "pid": self.proc.pid, "returncode": self.proc.poll(), "log": tail}

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def _wait_health(url: str, status: Any, timeout_s: float) -> None:
    import httpx
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        st = ray.get(status.remote(), timeout=30)
        if st["returncode"] is not None:
            last = next((x for x in reversed(st["log"]) if x.strip()), "no output")
            raise OpsError(f"splitserve serve on the head exited with {st['returncode']}: {last.strip()}")
        time.sleep(1.0)
    raise OpsError(f"{url}/health did not answer 200 within {timeout_s:g}s (the server log is "
                   ".splitserve-deploy/serve.log in the job's working directory on the head)")


def deploy_cluster(cluster_path: str, manifest_path: str, manifest: Manifest, *, up: bool = True,
                   address: str | None = None, host: str | None = None, port: int = 8000,
                   timeout_s: float = 900.0, namespace: str = "splitserve") -> str:
    """`splitserve deploy`: ray up (unless up is False), ship the project and manifest,
    start `splitserve serve` on the head, wait for /health; returns the URL."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    config = load_cluster_yaml(cluster_path)
    offers = cluster_offers(config)
    if offers is not None:
        check_fits(manifest, manifest_path, offers, cluster_path)
    if up:
        proc = subprocess.run(["ray", "up", "-y", "--no-config-cache", cluster_path], capture_output=True,
                              text=True, timeout=3600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise OpsError(f"{cluster_path}: ray up failed: {last}")
    addr = head_address(cluster_path, config, address)
    check_reachable(addr)
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=addr, namespace=namespace, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": SHIP_EXCLUDES})
    except Exception as e:  # noqa: BLE001 - one line
        raise OpsError(f"cannot join the Ray cluster at {addr}: {' '.join(str(e).split())[:300]}") from None
    if offers is None:
        total = ray.cluster_resources()
        check_fits(manifest, manifest_path, (total.get("CPU", 0.0), total.get("GPU", 0.0)),
                   f"the cluster at {addr}")
    name = SERVER_PREFIX + manifest.name
    try:
        old = ray.get_actor(name)
        raise OpsError(f"name: deployment {manifest.name!r} already runs on {addr} "
                       f"({ray.get(old.url.remote(), timeout=30)}); 'splitserve apply' changes it, "
                       "'splitserve down' stops it")
    except ValueError:
        pass
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    mp = Path(manifest_path).resolve()
    rel = str(mp.relative_to(PROJECT_ROOT)) if mp.is_relative_to(PROJECT_ROOT) else None
    actor = ray.remote(ServerProcess).options(
        name=name, lifetime="detached", num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote(
        rel, mp.read_text(), host, port)
    url = ray.get(actor.url.remote(), timeout=300)
    try:
        _wait_health(url, actor.status, timeout_s)
    except OpsError:
        with contextlib.suppress(Exception):
            ray.get(actor.stop.remote(), timeout=90)
        ray.kill(actor, no_restart=True)
        raise
    return str(url)


def down_cluster(cluster_path: str, *, name: str | None = None, address: str | None = None,
                 teardown: bool = False, namespace: str = "splitserve") -> list[str]:
    """`splitserve down`: stop the deployment(s) served on the cluster (all, or the one
    named), then with teardown `ray down`. Returns the stopped deployments' names."""
    import ray

    config = load_cluster_yaml(cluster_path)
    stopped: list[str] = []
    try:
        addr = head_address(cluster_path, config, address)
        check_reachable(addr)
        connect(addr, namespace)
    except OpsError:
        if not teardown:
            raise
        addr = None  # the cluster is gone or unreachable: ray down still tears it down
    if addr is not None:
        from ray.util import list_named_actors

        names = [a["name"] if isinstance(a, dict) else a for a in list_named_actors(all_namespaces=True)
                 if isinstance(a, dict) and a.get("namespace") == namespace]
        for actor_name in names:
            if not actor_name.startswith(SERVER_PREFIX):
                continue
            dep = actor_name[len(SERVER_PREFIX):]
            if name is not None and dep != name:
                continue
            actor = ray.get_actor(actor_name, namespace=namespace)
            with contextlib.suppress(Exception):
                ray.get(actor.stop.remote(), timeout=120)
            ray.kill(actor, no_restart=True)
            stopped.append(dep)
        if name is not None and not stopped:
            raise OpsError(f"name: no deployment {name!r} served on {addr}")
    if teardown:
        proc = subprocess.run(["ray", "down", "-y", cluster_path], capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise OpsError(f"{cluster_path}: ray down failed: {last}")
    return stopped
