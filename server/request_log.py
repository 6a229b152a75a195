"""One log line per HTTP request (id, tenant, route, model, status, latency, error reason) and ``X-Request-ID``.

The client's ``X-Request-ID`` is kept when it is a sane token, else one is generated; either way it is echoed
in the response and written on the line, so a client's report and the server log meet. Headers are never
logged, so API keys cannot reach the log.
"""

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("lorag.requests")

REQUEST_ID_HEADER = "x-request-id"
# Printable ASCII without spaces or quotes, as proxies (nginx $request_id, Envoy) generate them; anything else
# could forge log fields or headers, so it is replaced.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_MAX_CAPTURED_BYTES = 64 * 1024  # enough for a chat body's "model" or an error object; more is not read


class RequestLogMiddleware:
    """Pure ASGI (streaming responses are timed to their last byte, bodies are not buffered for the app).

    With ``metrics`` (server.metrics.Metrics) it also counts every response and its latency by route template
    (not raw path) and tenant, from the same status and timing as the log line.
    """

    def __init__(self, app: ASGIApp, metrics=None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        request_body = bytearray()
        response = {"status": 500, "json": False, "body": bytearray()}

        async def receive_and_keep() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(request_body) < _MAX_CAPTURED_BYTES:
                request_body.extend(message.get("body", b"")[: _MAX_CAPTURED_BYTES - len(request_body)])
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
                response["json"] = any(
                    k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers
                )
            elif message["type"] == "http.response.body" and response["status"] >= 400 and response["json"]:
                room = _MAX_CAPTURED_BYTES - len(response["body"])
                response["body"].extend(message.get("body", b"")[:room])
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_with_id)
        finally:
            status = response["status"]
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            elapsed = time.perf_counter() - started  # one reading for the log line and the metric
            fields = {
                "request_id": request_id,
                "method": scope["method"],
                "route": route,
                "tenant": scope["state"].get("tenant"),
                "model": _model_of(bytes(request_body)),
                "status": status,
                "latency_ms": round(elapsed * 1000, 1),
                "error": _error_reason(bytes(response["body"])) if status >= 400 else None,
            }
            if self.metrics is not None:
                tenant = fields["tenant"] or "-"
                self.metrics.requests.labels(route, fields["method"], str(status), tenant).inc()
                self.metrics.latency.labels(route, tenant).observe(elapsed)
            log.log(
                logging.WARNING if status >= 500 else logging.INFO,
                "%s %s %s status=%s tenant=%s model=%s latency_ms=%s%s",
                request_id, fields["method"], route, status, fields["tenant"] or "-", fields["model"] or "-",
                fields["latency_ms"], f" error={fields['error']!r}" if fields["error"] else "",
                extra={"request": fields},
            )


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key == REQUEST_ID_HEADER.encode():
            given = value.decode("latin-1")
            if _SAFE_REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def _model_of(body: bytes) -> str | None:
    """The ``model`` a JSON request asked for (chat, completions); None for other bodies."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):  # not JSON, or cut at the capture limit
        return None
    return model if isinstance(model, str) else None


def _error_reason(body: bytes) -> str | None:
    """The message of an OpenAI error object ``{"error": {"message": ...}}``."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "") or None
    return str(error) if error else None
