"""The HTTP edge's error conversion: every failure leaves as one OpenAI-style error object.

``{"error": {"message", "type", "param", "code"}}`` for HTTP exceptions, validation errors (400 naming the
field), :class:`LoragError` (its ``http_status``) and unexpected errors (500, no internals).
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.errors import LoragError, NotFound

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
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
    http_status = 503
    code = "server_busy"


class RequestTimeout(LoragError):
    http_status = 504
    code = "timeout"


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


def error_response(status: int, message: str, **fields) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, **fields), status_code=status, headers=headers)


def lorag_error_body(error: LoragError) -> tuple[int, dict]:
    status = error.http_status
    return status, error_body(
        status,
        str(error),
        error_type=getattr(error, "error_type", None),
        param=getattr(error, "param", None),
        code=getattr(error, "code", None),
    )


async def _lorag_error(request: Request, error: LoragError) -> JSONResponse:
    status, body = lorag_error_body(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    if error.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return error_response(error.status_code, message)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    # loc starts with where the value came from ("body", "query", "path"); the field follows.
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else None)
    where = f"{param}: " if param else ""
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return error_response(400, f"invalid request: {where}{first.get('msg', 'invalid value')}{more}", param=param)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return error_response(500, "internal server error; the server log has the details", error_type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LoragError, _lorag_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
