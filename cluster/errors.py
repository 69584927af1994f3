"""One error hierarchy. Each error says what was expected, what was found, what to do,
and maps to an HTTP status and an OpenAI error type at the ingress."""

from __future__ import annotations


class SplitServeError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class InvalidRequestError(SplitServeError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(SplitServeError):
    status_code = 404
    error_type = "not_found_error"


class OverloadedError(SplitServeError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


class NoHealthyPoolError(SplitServeError):
    status_code = 503
    error_type = "service_unavailable"


class WorkerFailedError(SplitServeError):
    """A worker died or timed out while serving a request."""

    status_code = 503
    error_type = "service_unavailable"


class ManifestError(SplitServeError):
    """A manifest problem: ``problems`` holds (field path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {r}" for p, r in problems))

    def lines(self) -> list[str]:
        return [f"{path}: {reason}" for path, reason in self.problems]
