"""The HTTP edge's error conversion: every failure leaves as one OpenAI-style error object.

HTTP exceptions, validation errors (400 naming the field), :class:`LoragError` (its ``http_status``) and
unexpected errors (500, no internals) all answer with :func:`server.errors.error_body`'s shape.
"""

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import LoragError
from server.errors import error_body, lorag_error_body

log = logging.getLogger(__name__)


def error_response(status: int, message: str, **fields) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, **fields), status_code=status, headers=headers)


async def _lorag_error(request: Request, error: LoragError) -> JSONResponse:
    status, body = lorag_error_body(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:  # whole seconds, rounded up: a client retrying sooner would be refused again
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(body, status_code=status, headers=headers or None)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    if error.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return error_response(error.status_code, message)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # loc is ("body", character offset), not a field
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return error_response(400, f"request body is not valid JSON at character {first['loc'][-1]}: {reason}")
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
