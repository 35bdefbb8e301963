"""Plain ASGI middleware (streams and disconnects pass through untouched): the request body size limit and the
bearer token check."""
from __future__ import annotations

import hmac

from fastapi import HTTPException

from gmaivl_rt.server.http_errors import error_response


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the server's limit of {limit} bytes (--max-request-bytes)")


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413: by Content-Length before reading, else while reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, RequestTooLarge(self.max_bytes).detail)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class BearerToken:
    """401 on /v1 paths without `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(header, self.expected):
                response = error_response(401, "missing or wrong API key (Authorization: Bearer ...)")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
