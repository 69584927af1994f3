"""Tiny built-in models (demo, tests): built once by make-model, cached on disk."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from models.paths import cache_root

BUILTIN = {"tiny-llama": ("llama", "tiny"), "tiny-mixtral": ("mixtral", "tiny"),
           "small-llama": ("llama", "small")}
# Bump when make-model's output changes, so caches are rebuilt.
VERSION = "v2"


def builtin_model_dir(name: str) -> Path:
    if name not in BUILTIN:
        raise ValueError(f"unknown builtin model {name!r}; allowed: {sorted(BUILTIN)}")
    root = cache_root() / "builtin"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{name}-{VERSION}"
    if (out / "model.safetensors").is_file():
        return out
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may ask at once
        if not (out / "model.safetensors").is_file():
            from models.make import make_model

            tmp = root / f".{name}-{VERSION}.tmp{os.getpid()}"
            arch, size = BUILTIN[name]
            make_model(arch, tmp, seed=0, size=size)
            tmp.rename(out)
    return out
