"""Where models/ keeps things: the cache directory and the training/tokenizer corpus.
Shared by builtin, make and train; imports none of them (no import cycle)."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))


def corpus_files(limit_bytes: int = 4 << 20) -> list[Path]:
    """A deterministic slice (sorted names) of the standard library's top-level .py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(root.glob("*.py")):
        size = p.stat().st_size
        if total + size > limit_bytes:
            break
        out.append(p)
        total += size
    return out
