"""What the controller knows of each worker it runs (shared by the controller, its
mixins and revival; imports nothing of the project)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerRecord:
    worker_id: str
    pool: str
    slot: int
    handle: Any
    node_ip: str | None = None
    healthy: bool = False
    misses: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    # The worker's placement group (placement.groups.WorkerGroup); removed with the worker.
    group: Any = None
    # Being drained before removal (scale-down, rollout): routed no new requests.
    retiring: bool = False
    # The controller's liveness view (cluster.liveness.Liveness), made at the first check.
    liveness: Any = None
