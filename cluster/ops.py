"""The operator's commands against a running deployment (apply; deploy and down later):
connect to its Ray cluster, find its controller, act. Errors are one line (OpsError)."""

from __future__ import annotations

import os
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


def apply_manifest(manifest: Manifest, address: str | None = None, namespace: str = "splitserve",
                   drain_timeout_s: float | None = None, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Roll the manifest out on the running deployment of its name; returns the
    controller's summary ({"ok": False, "problems": [...]} for fields needing a restart)."""
    import ray

    ctl = controller_of(manifest, address, namespace)
    return ray.get(ctl.apply.remote(manifest.model_dump_json(), drain_timeout_s), timeout=timeout_s)  # type: ignore[no-any-return]
