"""Errors the serving layer returns to HTTP clients, always ``{"error": {message, type, param, code}}``.

Raised anywhere below the routes (validation, auth, engine) and turned into one JSON response by
the ingress, so a client never sees an HTML page or a bare 500 for input it can fix. The shape is
OpenAI's, so its official clients raise their usual exception types (``BadRequestError``, ...).
"""

from __future__ import annotations

from typing import Any

# The ``type`` each status carries; clients may branch on it.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

# The default ``code`` per status; a raise site may give a more precise one.
ERROR_CODES: dict[int, str] = {
    400: "invalid_value",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "context_length_exceeded",
    429: "overloaded",
    500: "internal_error",
    503: "overloaded",
}


class ServeError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(status, message, param, code, type, retry_after_s)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or ERROR_CODES.get(status, "invalid_value")
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        """Headers a client needs to act on the error: how to authenticate, when to retry."""
        out: dict[str, str] = {}
        if self.status == 401:
            out["WWW-Authenticate"] = "Bearer"
        if self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain form that crosses process boundaries (model replica to ingress) unchanged."""
        return {"status": self.status, **self.body()["error"], "retry_after_s": self.retry_after_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeError:
        return cls(d["status"], d["message"], d.get("param"), d.get("code"), d.get("type"),
                   d.get("retry_after_s"))


class BadRequest(ServeError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(400, message, param, code)


class Unauthorized(ServeError):
    def __init__(self, message: str) -> None:
        super().__init__(401, message)


class NotFound(ServeError):
    def __init__(self, message: str, param: str | None = None, code: str = "not_found") -> None:
        super().__init__(404, message, param, code)


class ContextTooLong(ServeError):
    """Prompt tokens plus the requested length do not fit the model's context (HTTP 413)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(413, message, param, "context_length_exceeded")


class TooLarge(ServeError):
    """The request body is over the server's byte limit (HTTP 413)."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message, None, "request_too_large")


class Overloaded(ServeError):
    """The model's queue is full: retry later (HTTP 503, or 429, with Retry-After)."""

    def __init__(self, message: str, status: int = 503, retry_after_s: float = 1.0) -> None:
        super().__init__(status, message, None, "overloaded", retry_after_s=retry_after_s)


class Timeout(ServeError):
    def __init__(self, message: str) -> None:
        super().__init__(408, message, None, "request_timeout")


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
