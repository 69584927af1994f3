"""Errors of the placement package. Kept free of ``cluster`` so that placement stays a
library the CLI (and anyone else) can call without the serving stack."""

from __future__ import annotations


class PlacementInputError(ValueError):
    """An input to the placement tools is invalid.

    ``field`` names the input (``trace``, ``gpus``, ``slots``, ...); the message says what
    was found and what is allowed, so the CLI can print it as is (exit 2).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message
