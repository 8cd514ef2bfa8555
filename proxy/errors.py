"""Exception types carrying an HTTP status and an OpenAI error type, and the one place that turns
them into responses. Error bodies follow OpenAI's {"error": {...}} shape and never hold tracebacks.
"""

from __future__ import annotations

import msgspec


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> bytes:
        return msgspec.json.encode({"error": {"message": self.message, "type": self.type,
                                              "param": self.param, "code": self.code}})

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"


class RequestTimeout(ApiError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    type = "invalid_request_error"


class Overloaded(ApiError):
    """Admission refused the request: the host is at capacity. Never a worker's failure."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class NoWorkerReady(ApiError):
    status = 503
    type = "server_error"
    code = "no_worker_ready"


class UpstreamError(ApiError):
    """The worker failed the request (crash, internal error)."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(ApiError):
    status = 504
    type = "server_error"
    code = "timeout"


class SlowClient(ConnectionResetError):
    """A streaming client did not take its bytes within timeouts.stream_write_s: the stream is
    cut and its slot freed (logged as a cancellation, error client_too_slow)."""
