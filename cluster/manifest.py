"""The operator's YAML manifest: model, pools, KV cache, transfer, SLOs.

The schema (``cluster.manifest_schema``) is strict: a typo is an error with a field path,
never a silent default. ``load_manifest`` also checks what needs the model files
(``cluster.manifest_checks``: directory exists, tp divides the heads, block counts) and
reports every problem at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from cluster.errors import ManifestError
from cluster.manifest_checks import check_against_model, check_api_keys_file, check_kv_tls
from cluster.manifest_schema import (AFD_POOLS, AutoscalingSpec, HardwareSpec, KVCacheSpec, KVTransferSpec, Manifest,
                                     ModelSpec, PoolSpec, ServerSpec, SLOSpec, WorkloadSpec)

__all__ = ["AFD_POOLS", "AutoscalingSpec", "HardwareSpec", "KVCacheSpec", "KVTransferSpec", "Manifest", "ModelSpec",
           "PoolSpec", "ServerSpec", "SLOSpec", "WorkloadSpec", "load_manifest", "parse_manifest"]


def _field_path(loc: tuple[object, ...]) -> str:
    """a.b.c; list indices as [i]; a key that is not a plain name is quoted (JSON), so the
    path before ': reason' is never ambiguous."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        else:
            name = str(x)
            if not re.fullmatch(r"[A-Za-z0-9_\-\[\]<>]+", name):
                name = json.dumps(name)
            out += ("." if out else "") + name
    return out or "<root>"


def parse_manifest(data: object, base_dir: str = ".", require_tokenizer: bool = False) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError([("<root>", f"expected a mapping, found {type(data).__name__}")])
    try:
        m = Manifest.model_validate({**data, "base_dir": base_dir})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = _field_path(tuple(err["loc"]))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling; see the manifest reference in README)"
            problems.append((loc, msg))
        raise ManifestError(problems) from None
    misplaced = [(f"pools.{name}.{f}", "applies to the expert pool only")
                 for name, pool in m.pools.items() if name != "expert"
                 for f in ("placement", "micro_batches") if getattr(pool, f) is not None]
    misplaced += [(f"pools.{name}.autoscaling", "attention/expert pools do not autoscale (the expert "
                   "placement fixes their size); allowed on prefill, decode, colocated")
                  for name, pool in m.pools.items() if name in AFD_POOLS and pool.autoscaling is not None]
    misplaced += [(f"pools.{name}.replicas", f"{pool.replicas} outside autoscaling "
                   f"{pool.autoscaling.min_replicas}..{pool.autoscaling.max_replicas}")
                  for name, pool in m.pools.items() if pool.autoscaling is not None
                  and not pool.autoscaling.min_replicas <= pool.replicas <= pool.autoscaling.max_replicas]
    if misplaced:
        raise ManifestError(misplaced)
    if m.afd:
        placement = m.pools["expert"].placement  # type: ignore[index]
        if isinstance(placement, str) and placement != "even" and not Path(placement).is_absolute():
            # Workers read it wherever they run: resolve it against the manifest's directory.
            m.pools["expert"].placement = str((Path(base_dir) / placement).resolve())  # type: ignore[index]
    check_api_keys_file(m)
    check_kv_tls(m, base_dir)
    check_against_model(m, require_tokenizer)
    return m


def load_manifest(path: str | Path, require_tokenizer: bool = False) -> Manifest:
    p = Path(path)
    if not p.is_file():
        raise ManifestError([("<file>", f"manifest {p} does not exist")])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ManifestError([("<file>", f"not valid YAML: {e}")]) from None
    return parse_manifest(data, base_dir=str(p.parent.resolve()), require_tokenizer=require_tokenizer)
