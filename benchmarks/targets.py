"""What a bench run points at: a running server (`--url`), or one of our manifests that
the bench deploys in-process (`--manifest`), optionally scaled onto N fake Ray nodes
(`--nodes`). Each is a context manager that yields a Target and tears down what it made.

Scaling to N nodes (no planner yet): every pool gets N times its replicas, pinned
round-robin through `pools.*.nodes` to the N fake nodes, so each node runs one copy of
the manifest's layout. Fake nodes come from `ray.cluster_utils.Cluster`: a head on
127.0.0.1 with no CPUs (driver, ingress, controller) and N worker nodes on 127.0.0.2...
with `cpus_per_node` logical CPUs each. They all share this machine's cores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Target:
    url: str
    layout: str          # label of the layout (manifest name, or the URL)
    nodes: int
    gpus: float          # accelerators the layout uses (see metrics.py: CPUs on CPU)
    gpu_unit: str        # "gpu", "cpu" or "server" (unknown: one server)
    workers: dict[str, list[str]] | None = None  # pool -> node IP of each worker (ours only)


def _worker_nodes(dep: Any) -> dict[str, list[str]] | None:
    import ray

    try:
        state = ray.get(dep.controller.get_state.remote(), timeout=30)
    except Exception as e:  # noqa: BLE001 - informative only
        logger.warning("could not read the deployment's workers: %s", e)
        return None
    return {pool: sorted(str(w.get("node_ip")) for w in ws) for pool, ws in state["pools"].items()}


def manifest_gpus(manifest: Any) -> tuple[float, str]:
    """Accelerators a manifest reserves: GPUs when any pool asks for them, else CPUs."""
    pools = manifest.pools.values()
    if any(p.num_gpus > 0 for p in pools):
        return float(sum(p.replicas * p.tp * p.num_gpus for p in pools)), "gpu"
    return float(sum(p.replicas * p.tp * p.num_cpus for p in pools)), "cpu"


def manifest_cpus(manifest: Any) -> float:
    return float(sum(p.replicas * p.tp * p.num_cpus for p in manifest.pools.values()))


def scale_manifest(manifest: Any, ips: list[str]) -> Any:
    """The manifest with len(ips) times the replicas of every pool, pinned round-robin."""
    from cluster.manifest import parse_manifest

    data = manifest.model_dump(mode="json")
    data["name"] = f"{manifest.name}-n{len(ips)}"
    for name, pool in manifest.pools.items():
        data["pools"][name]["replicas"] = pool.replicas * len(ips)
        data["pools"][name]["nodes"] = list(ips)
    return parse_manifest(data, base_dir=manifest.base_dir)


@contextlib.contextmanager
def url_target(url: str, nodes: int, gpus: float | None) -> Iterator[Target]:
    yield Target(url.rstrip("/"), url.rstrip("/"), nodes, gpus if gpus else 1.0,
                 "gpu" if gpus else "server")


@contextlib.contextmanager
def _serve(manifest: Any, nodes: int, gpus: float | None, label: str) -> Iterator[Target]:
    from cluster.serve import Server, deploy

    dep = deploy(manifest, timeout_s=600)
    server = Server(dep)
    try:
        url = server.start()
        used, unit = manifest_gpus(manifest)
        yield Target(url, label, nodes, gpus if gpus else used, unit, _worker_nodes(dep))
    finally:
        server.stop()
        dep.stop()


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[None]:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), else start a local one with
    `num_cpus` logical CPUs; stops only what it started. One per invocation: every layout
    of a --compare runs on the same Ray, with the same CPUs."""
    import ray

    from cluster.serve import init_ray

    started = init_ray(address, num_cpus=num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def manifest_target(manifest: Any, gpus: float | None) -> Iterator[Target]:
    """Deploy on the Ray cluster this process is connected to (see ray_session)."""
    with _serve(manifest, 1, gpus, manifest.name) as t:
        yield t


@contextlib.contextmanager
def fake_nodes(n: int, cpus_per_node: int) -> Iterator[list[str]]:
    """A local Ray cluster of n fake worker nodes; yields their IPs; the driver is connected."""
    import cluster  # noqa: F401 - Ray environment before ray is imported
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("--nodes starts its own fake Ray cluster; this process is already "
                           "connected to Ray (use --nodes without --address)")
    c = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 0, "include_dashboard": False})
    try:
        ips = []
        for i in range(n):
            ip = f"127.0.0.{i + 2}"
            c.add_node(node_ip_address=ip, num_cpus=int(cpus_per_node))
            ips.append(ip)
        c.wait_for_nodes(timeout=60)
        ray.init(address=c.address, namespace="splitserve-bench", log_to_driver=False)
        try:
            yield ips
        finally:
            ray.shutdown()
    finally:
        c.shutdown()


@contextlib.contextmanager
def nodes_target(manifest: Any, n: int, cpus_per_node: int | None,
                 gpus: float | None) -> Iterator[Target]:
    per_node = cpus_per_node or max(1, round(manifest_cpus(manifest)))
    with fake_nodes(n, per_node) as ips:
        scaled = scale_manifest(manifest, ips)
        logger.info("nodes=%d: %s", n, {k: p.replicas for k, p in scaled.pools.items()})
        with _serve(scaled, n, gpus * n if gpus else None, manifest.name) as t:
            yield t
