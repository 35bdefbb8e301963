"""Plain ASGI middleware (streams and disconnects pass through untouched): security headers on every response, the
Host header check, the last-resort error answer, the request body size limit and the bearer token check."""
from __future__ import annotations

import asyncio
import hmac
import logging
import traceback

from fastapi import HTTPException

from gmaivl_rt.server.http_errors import error_body, error_response
from gmaivl_rt.server.metrics import current_outcome
from gmaivl_rt.server.sse import DONE, event

log = logging.getLogger("gmaivl_rt.server")

# The page loads only its own script and style, shows previews as data: images and talks only to this server;
# nothing may frame it (clickjacking) or sniff a response into another type.
SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


class SecurityHeaders:
    """Add SECURITY_HEADERS to every HTTP response (errors, the page, static files, streams)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", ())}
                message["headers"] = list(message.get("headers", ())) + [
                    (name, value) for name, value in SECURITY_HEADERS if name not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def host_name(header: bytes) -> str:
    """A Host header's host, lower case, without its port ('[::1]:8000' -> '::1')."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class AllowedHosts:
    """400 unless the Host header names one of `hosts` (DNS rebinding: a web page whose name an attacker points at
    this server's address still sends its own name). '*' allows any."""

    def __init__(self, app, hosts):
        self.app, self.hosts = app, {h.lower().strip("[]") for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.hosts:
            header = dict(scope.get("headers") or ()).get(b"host", b"")
            if host_name(header) not in self.hosts:
                response = error_response(400, "the Host header names no host this server answers to "
                                               "(--allowed-hosts)")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def code_location(error: BaseException) -> str:
    """Where an exception was raised, as code: 'file.py:123 in function' (no message: it may quote input)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


SHUTTING_DOWN = "the server is shutting down; retry later"


class InternalErrors:
    """The last resort: an exception no handler took becomes a 500 JSON answer and one log line naming its type and
    code location, never its message or a traceback (both may quote a file name or input). It is not re-raised,
    so the connection stays usable for the client's next request.

    A request still running when the server stops (uvicorn cancels it once its graceful period is over; its engine
    request is cancelled on the way out) is answered 503, or, for a stream already under way, ends with a 503
    error event and `[DONE]`, as a failure mid-stream does; it is counted `cancelled`, and nothing is logged as an
    error (uvicorn would log the cancellation with a traceback, and answer 500)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = finished = streaming = False

        async def tracking_send(message):
            nonlocal started, finished, streaming
            if message["type"] == "http.response.start":
                started = True
                headers = {name.lower(): value for name, value in message.get("headers", ())}
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                finished = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            log.error("internal error: %s at %s", type(error).__name__, code_location(error))
            if not started:
                await error_response(500, "internal server error")(scope, receive, send)
        except asyncio.CancelledError:  # the server is stopping
            log.info("request ended by the server's shutdown")
            if (outcome := current_outcome()) is not None:
                outcome.stopped = True
            if not started:
                await error_response(503, SHUTTING_DOWN)(scope, receive, send)
            elif not finished:
                tail = (event(error_body(503, SHUTTING_DOWN)) + DONE).encode() if streaming else b""
                await send({"type": "http.response.body", "body": tail, "more_body": False})


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
