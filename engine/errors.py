"""Errors of the engine (no Ray, no HTTP): each says what was found and what is allowed."""


class EngineError(Exception):
    pass


class ModelLoadError(EngineError):
    """A model directory, config field or weight that cannot be used."""
