"""Errors the serving layer returns to HTTP clients, always as ``{"error": {message, type, param}}``.

Raised anywhere below the routes (engine, validation, auth) and turned into one JSON response by
the app, so a client never sees an HTML page or a bare 500 for input it can fix.
"""

from __future__ import annotations

from typing import Any

# The ``type`` each status carries; clients may branch on it.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "context_length_exceeded",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ServeError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` the field at fault."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param)


class BadRequest(ServeError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, param)


class Unauthorized(ServeError):
    def __init__(self, message: str):
        super().__init__(401, message)


class NotFound(ServeError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(404, message, param)


class ContextTooLong(ServeError):
    """Prompt tokens plus the requested length do not fit the model's context (HTTP 413)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(413, message, param)


def error_body(message: str, type: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param}}
