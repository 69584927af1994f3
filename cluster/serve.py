"""Bring a manifest up: join or start Ray, start the controller and its pools, serve HTTP.
Stopping (Ctrl-C) shuts down every actor this process started."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import cluster  # noqa: F401 - sets Ray's environment before ray is imported
import ray
import uvicorn

from cluster.controller import start_controller
from cluster.revival import remove_leftovers
from cluster.http_app import build_app
from cluster.ingress import Ingress
from cluster.manifest import Manifest
from placement.groups import PlacementGroupError

logger = logging.getLogger(__name__)

NAMESPACE = "splitserve"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the cluster at address (or RAY_ADDRESS), else start a local one on loopback.
    Returns True when this process started Ray (and must stop it)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return False
    # address="local": a new cluster even when another one runs on this machine (without
    # it Ray joins the most recently started one).
    ray.init(address="local", _node_ip_address="127.0.0.1", namespace=NAMESPACE, include_dashboard=False,
             num_cpus=num_cpus, log_to_driver=False)
    return True


@dataclass
class Deployment:
    """A running manifest: its controller and ingress. stop() kills every actor it made."""

    manifest: Manifest
    controller: Any
    ingress: Ingress
    # Names the deployment's detached workers and placement groups (default: manifest.name).
    name: str | None = None

    def stop(self, timeout_s: float = 30.0) -> None:
        try:
            ray.get(self.controller.shutdown.remote(), timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - best effort, then kill
            logger.warning("controller shutdown failed: %s", e)
        ray.kill(self.controller, no_restart=True)
        # Workers are detached (they outlive a controller that dies and is revived): any
        # the shutdown did not reach go now.
        left = remove_leftovers(self.name or self.manifest.name)
        if left:
            logger.warning("killed %d worker(s) the controller's shutdown left", left)


def deploy(manifest: Manifest, timeout_s: float = 600.0, name: str | None = None) -> Deployment:
    """Create the controller and all pools; returns once every worker has started."""
    from engine.config import ModelConfig
    from engine.loader import load_tokenizer

    model_dir = manifest.model_dir()  # builds a builtin model here, once, not in every worker
    cfg = ModelConfig.from_dir(model_dir)
    controller = start_controller(manifest, name)
    try:
        ray.get(controller.start.remote(), timeout=timeout_s)
    except BaseException as e:
        try:
            ray.get(controller.shutdown.remote(), timeout=30)
        finally:
            ray.kill(controller, no_restart=True)
            remove_leftovers(name or manifest.name)
        cause = getattr(e, "cause", None)
        if isinstance(cause, PlacementGroupError):  # the controller's error, without Ray's wrapping
            raise PlacementGroupError(str(cause)) from None
        raise
    max_len = manifest.model.max_model_len or cfg.max_position_embeddings
    ingress = Ingress(manifest, controller, load_tokenizer(model_dir), max_len)
    return Deployment(manifest, controller, ingress, name)


class Server:
    """uvicorn serving a deployment's app in a background thread (tests, bench)."""

    def __init__(self, dep: Deployment, host: str = "127.0.0.1", port: int = 0) -> None:
        self.dep = dep
        config = uvicorn.Config(build_app(dep.ingress), host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 60.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("HTTP server did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve_forever(manifest: Manifest, host: str, port: int, address: str | None) -> int:
    """The `splitserve serve` command: blocks until Ctrl-C; prints 'ready' when healthy."""
    started_ray = init_ray(address)
    dep = None
    try:
        try:
            dep = deploy(manifest)
        except PlacementGroupError as e:
            print(f"splitserve: {e}", file=sys.stderr, flush=True)
            return 1
        config = uvicorn.Config(build_app(dep.ingress), host=host, port=port, log_level="info",
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)

        async def announce() -> None:
            import httpx

            url = f"http://{host}:{port}/health"
            async with httpx.AsyncClient(timeout=2) as client:
                for _ in range(600):
                    try:
                        if (await client.get(url)).status_code == 200:
                            print(f"splitserve ready on http://{host}:{port} "
                                  f"(model {manifest.model.name!r}, mode {manifest.mode})", flush=True)
                            return
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
            print("splitserve: server did not become healthy within 60s", flush=True)

        async def main() -> None:
            task = asyncio.get_running_loop().create_task(announce())
            await server.serve()
            task.cancel()

        asyncio.run(main())
        return 0
    finally:
        if dep is not None:
            dep.stop()
        if started_ray:
            ray.shutdown()
