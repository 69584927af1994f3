"""Errors of the engine (no Ray, no HTTP): each says what was found and what is allowed."""


class EngineError(Exception):
    pass


class ModelLoadError(EngineError):
    """A model directory, config field or weight that cannot be used."""


class UnsupportedRequestError(EngineError, ValueError):
    """A request asks for something this engine does not do (e.g. logprobs on a vLLM pool):
    the client's request is refused (HTTP 400 naming ``param``), the worker is fine."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[object, ...]:  # crosses Ray as itself, param included
        return (type(self), (str(self), self.param))
