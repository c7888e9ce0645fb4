"""OpenAI-style error bodies `{"error": {"message", "type", "param", "code"}}`; no web framework (batch uses them)."""

from __future__ import annotations

from typing import Any

from producer.errors import ProtocolError, QueueFull, RequestFailed
from producer.protocol import ErrorCode

# Wire error codes of a failed request -> (HTTP status, OpenAI error type); str keys: a newer worker may send a
# code this gateway does not know, and it is looked up as it came
_FAILED: dict[str, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_MODEL: (404, "invalid_request_error"),
    ErrorCode.DEADLINE: (504, "timeout_error"),
    ErrorCode.MAX_DELIVERIES: (500, "server_error"),
    ErrorCode.UNSUPPORTED_VERSION: (500, "server_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
    ErrorCode.UNKNOWN_REQUEST: (503, "server_error"),  # Redis lost it after the submit (a crash or failover): retry
}


class APIError(Exception):
    """An error answered to the HTTP client as OpenAI would shape it."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 naming the request field at fault."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def unsupported(param: str, what: str = "is not supported by this server") -> APIError:
    return APIError(400, f"{param}: {what}", param=param, code="unsupported_parameter")


def from_protocol_error(exc: ProtocolError, renames: dict[str, str] | None = None) -> APIError:
    """A wire validation error (`params.top_p: must be ...`) as a 400 naming the OpenAI field."""
    head = exc.message.split(":", 1)[0]
    param = head.removeprefix("params.") if head.replace(".", "").replace("_", "").isalnum() else None
    if param is not None and renames:
        param = renames.get(param, param)
    message = exc.message if param is None else f"{param}:{exc.message.split(':', 1)[1]}"
    return APIError(400, message, param=param, code=exc.code)


def from_queue_full(exc: QueueFull, retry_after_s: int) -> APIError:
    return APIError(
        429,
        f"The server is busy: {exc.depth} requests are waiting for model {exc.model!r}. Retry after a moment.",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def from_request_failed(exc: RequestFailed) -> APIError:
    status, kind = _FAILED.get(exc.code, (500, "server_error"))
    return APIError(status, exc.message or exc.code, type=kind, code=exc.code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model {model!r} does not exist or no worker serves it", param="model", code="model_not_found"
    )
