"""Request body size limits that protect the process (413); chat admission is server.admission."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import BodyTooLarge, error_body


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with 413, whether or not Content-Length is sent.

    Multipart uploads may use ``max_bytes``; every other body (JSON) at most ``max_json_bytes``, since
    the whole of it is parsed in memory.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_json_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_bytes = min(max_json_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.max_bytes if multipart else self.max_json_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, int(declared), limit)
            return
        if declared is not None:  # the server enforces the declared length
            await self.app(scope, receive, send)
            return

        # Chunked upload: read it all (bounded) before the app sees any of it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(send, size, limit)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int, limit: int) -> None:
        setting = "server.max_json_bytes" if limit == self.max_json_bytes else "server.max_body_bytes"
        error = BodyTooLarge(f"request body of {size} bytes is over the limit of {limit} bytes ({setting})")
        body = json.dumps(error_body(413, str(error), code=error.code)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
