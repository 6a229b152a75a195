"""The server's error types and the OpenAI error object ``{"error": {"message", "type", "param", "code"}}``.

Free of FastAPI so services (adapters, engine glue) can raise these without the web stack;
``server.error_handlers`` installs the conversion on the app.
"""

from core.errors import LoragError, NotFound

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class InvalidRequest(LoragError):
    """A request field breaks a server limit or rule; ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Unauthorized(LoragError):
    http_status = 401


class Forbidden(LoragError):
    http_status = 403


class ModelNotFound(NotFound):
    """Unknown ``model``: OpenAI answers 404 with type invalid_request_error and code model_not_found."""

    error_type = "invalid_request_error"
    param = "model"
    code = "model_not_found"


class BodyTooLarge(LoragError):
    http_status = 413
    code = "request_too_large"


class ServerBusy(LoragError):
    """Every slot and the whole queue are taken (or the server is starting); ``retry_after`` in seconds."""

    http_status = 503
    code = "server_busy"

    def __init__(self, message: str, *, hint: str | None = None, retry_after: float = 1.0):
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class TenantOverLimit(LoragError):
    """One tenant is over its own limit (per-minute budget or share of the queue); others are still served."""

    http_status = 429

    def __init__(self, message: str, *, retry_after: float, code: str):
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code


class RequestTimeout(LoragError):
    http_status = 504
    code = "timeout"


class RemoteUnavailable(LoragError):
    """No configured generation server (generation.remote_url) could be reached."""

    http_status = 503
    code = "remote_unavailable"


class RemoteFailed(LoragError):
    """A generation server answered with an error lorag cannot pass on as the client's own mistake."""

    http_status = 502
    code = "remote_error"


def error_body(status: int, message: str, *, error_type: str | None = None, param=None, code=None) -> dict:
    """The OpenAI error object, used by the handlers below and by the streaming route mid-stream."""
    return {
        "error": {
            "message": message,
            "type": error_type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def lorag_error_body(error: LoragError) -> tuple[int, dict]:
    status = error.http_status
    return status, error_body(
        status,
        str(error),
        error_type=getattr(error, "error_type", None),
        param=getattr(error, "param", None),
        code=getattr(error, "code", None),
    )
