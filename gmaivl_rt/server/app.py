"""`create_app(engine, ...)`: the OpenAI-compatible HTTP server over a `gmaivl_rt.Engine`, in vLLM's shapes.

A thin layer: requests are turned into the engine's `submit(messages=, images=, system=, **generation)`; images go
through the request boundary (`gmaivl_rt.medical_io`'s readers behind `to_medical_image`) in a worker thread, never on
the event loop; the chat template, limits and decoding are the engine's. What this layer adds is HTTP: JSON and SSE
shapes, status codes, authentication, body size, media URLs, metrics and the web page.

Status codes: 400 bad JSON / parameters / images (the boundary's `InputError`, message passed through: it names the
input by role and never echoes bytes or header values), 401 missing or wrong bearer token (with `api_key`), 404 an
unknown model name or path, 413 a body over `max_request_bytes`, 429 when `max_waiting` requests already wait in
the engine's queue (without `max_waiting` requests queue in the engine until a slot is free), 503 engine dead.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gmaivl_rt.errors import GmaivlError, InputError, LimitError
from gmaivl_rt.server import protocol
from gmaivl_rt.server.media import read_image_url
from gmaivl_rt.server.metrics import ServerMetrics

log = logging.getLogger("gmaivl_rt.server")
STATIC = Path(__file__).parent / "static"
MAX_MESSAGE_CHARS = 300
_STATUS_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                 405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 429: "TooManyRequests",
                 500: "InternalServerError", 503: "ServiceUnavailable"}


class _TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the server's limit of {limit} bytes (--max-request-bytes)")


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = protocol.error_body(message[:MAX_MESSAGE_CHARS], _STATUS_TYPES.get(status, "Error"), status, param)
    return JSONResponse(body, status_code=status)


class _BodyLimit:
    """Refuse bodies over `max_bytes` with 413: by Content-Length before reading, else while reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, _TooLarge(self.max_bytes).detail)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class _BearerToken:
    """401 on /v1 paths without `Authorization: Bearer <api_key>` (plain ASGI: streams and disconnects pass through
    untouched)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(header, self.expected):
                response = error_response(401, "missing or wrong API key (Authorization: Bearer ...)")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """Field paths and pydantic's messages only: `input` values (the request's own data) are never quoted."""
    problems, param = [], None
    for item in error.errors():
        if item.get("type") == "json_invalid":
            return "request body is not valid JSON", None
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        # Union members appear in the path as type names (e.g. 'list[...]'); they say nothing to a client.
        loc = [p for p in loc if "[" not in p and p not in ("str", "function-after", "TextPart", "ImagePart")]
        param = param or ".".join(loc) or None
        problems.append(f"{'.'.join(loc) or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(dict.fromkeys(problems)) or "invalid request", param


# ---------------------------------------------------------------------------------------------------- requests
def chat_turns(messages: list[protocol.ChatMessage]) -> tuple[str | None, list[dict], list[protocol.ImageURL]]:
    """OpenAI messages -> (system prompt, chat turns for the request boundary, image URLs in order).

    Turns carry content parts (`gmaivl_rt.chat.chat_parts`), so text a client sends stays literal text (a typed
    `<image>` or `<|im_start|>` is not a slot or a marker). As vLLM does for InternVL-family models, a turn's image
    slots come first, each followed by a newline, then its text parts joined by newlines: [image, text] and
    [text, image] both ask exactly what `Engine.ask(text, image)` asks.
    """
    system_parts, turns, images = [], [], []
    for i, message in enumerate(messages):
        content = message.content
        if content is None or content == "" or content == []:
            raise InputError(f"messages[{i}]: content is empty")
        if isinstance(content, str):
            texts, urls = [content], []
        else:
            texts = [p.text for p in content if p.type == "text"]
            urls = [p.image_url for p in content if p.type == "image_url"]
        if message.role in ("system", "developer"):
            if urls:
                raise InputError(f"messages[{i}]: a {message.role} message cannot carry images")
            system_parts.append("\n".join(texts))
            continue
        if urls and message.role == "assistant":
            raise InputError(f"messages[{i}]: an assistant message cannot carry images")
        images.extend(urls)
        parts = [{"type": "image"}, {"type": "text", "text": "\n"}] * len(urls)
        turns.append({"role": message.role, "content": parts + [{"type": "text", "text": "\n".join(texts)}]})
    if not turns or turns[-1]["role"] != "user":
        raise InputError("messages: the last message must be a user message")
    return ("\n".join(system_parts) if system_parts else None), turns, images


def generation_options(body: protocol.ChatCompletionRequest) -> dict:
    """OpenAI sampling fields -> the engine's generation keywords; fields a request leaves out are not passed, so
    the runtime's defaults (`gmaivl_rt.runtime.DEFAULT_GENERATION`) apply. temperature 0 means greedy."""
    options = {}
    max_new_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    if body.temperature is not None:
        options.update(do_sample=False) if body.temperature == 0 else \
            options.update(do_sample=True, temperature=body.temperature)
    if body.top_p is not None:
        options["top_p"] = body.top_p
    if body.seed is not None:
        options["seed"] = body.seed
    if body.stop:
        options["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    return options


# ---------------------------------------------------------------------------------------------------- engine
_END = object()


class Generation:
    """One engine request seen from the event loop: its text deltas (read in a worker thread, so the loop never
    blocks), cancellation, and the metrics it records when it ends. Times are the server's monotonic clock, from the
    HTTP request's arrival (image decoding included)."""

    def __init__(self, request, arrival: float, metrics: ServerMetrics):
        self.request, self.arrival, self.metrics = request, arrival, metrics
        self._iterator = iter(request)
        self.first_token: float | None = None
        self.done = False
        self.text = ""

    async def next_delta(self):
        """The next piece of the answer, or `_END`. Raises the request's error (InputError, LimitError, ...)."""
        if self.done:
            return _END
        try:
            delta = await run_in_threadpool(next, self._iterator, _END)
        except Exception:  # the request failed (ended); a CancelledError here is the client leaving: cancel() follows
            self.done = True
            raise
        now = time.monotonic()
        if delta is _END:
            self.done = True
            self._finished(now)
            return _END
        if self.first_token is None:
            self.first_token = now
        self.text += delta
        return delta

    @property
    def finish_reason(self) -> str:
        return str(getattr(self.request, "finish_reason", None) or "stop")

    @property
    def prompt_tokens(self) -> int:
        return int(getattr(self.request, "prompt_tokens", 0) or 0)

    @property
    def completion_tokens(self) -> int:
        return int(getattr(self.request, "generated_tokens", 0) or 0)

    def _finished(self, now: float):
        self.metrics.observe_finished(
            finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.completion_tokens, arrival=self.arrival, first_token=self.first_token,
            finish=now, scheduled=_request_time(self.request, "scheduled"), token_gaps=self._token_gaps())

    def _token_gaps(self) -> list[float]:
        """Inter-token latency: the engine's first-token to finish time spread over the tokens after the first
        (streamed deltas may join several tokens, so the gaps between deltas are not the gaps between tokens)."""
        first, finish = getattr(self.request, "first_token_time", None), getattr(self.request, "finish_time", None)
        n = self.completion_tokens
        if first is None or finish is None or n < 2:
            return []
        return [max(0.0, finish - first) / (n - 1)] * (n - 1)

    def cancel(self):
        """Stop the engine request (client gone, or an error): its batch slot and KV blocks are freed."""
        if not self.done:
            self.done = True
            self.request.cancel()


def _request_time(request, what: str) -> float | None:
    """An engine request's `<what>_time` stamp (time.time()) on the server's monotonic clock, or None if unset."""
    stamp = getattr(request, f"{what}_time", None)
    return None if stamp is None else time.monotonic() - (time.time() - stamp)


def engine_alive(engine) -> bool:
    """The engine takes and runs requests: `is_alive()` where the engine has it, else its scheduler thread."""
    try:
        alive = getattr(engine, "is_alive", None)
        if alive is not None:
            return bool(alive() if callable(alive) else alive)
        thread = getattr(engine, "_thread", None)
        if getattr(engine, "_closed", False) or (thread is not None and not thread.is_alive()):
            return False
        engine.stats()
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------------- the app
def create_app(engine, *, served_model_name: str = "gmaivl", api_key: str | None = None,
               max_request_bytes: int = 64 * 2**20, max_images_per_request: int | None = None,
               allowed_local_media_path=None, allow_remote_media: bool = False, max_waiting: int | None = None,
               limits=None):
    """The ASGI app serving `engine` (a `gmaivl_rt.Engine`). `limits`: the request boundary's `Limits` (default:
    the engine's); `max_images_per_request` overrides its images-per-request limit. See the module doc for status
    codes. Endpoints: POST /v1/chat/completions, GET /v1/models, POST /v1/gmaivl/preview, GET /health, /metrics, /."""
    limits = _server_limits(engine, limits, max_images_per_request)
    metrics = ServerMetrics(engine)
    app = FastAPI(title="gmaivl-rt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    media_options = {"allowed_local_media_path": allowed_local_media_path, "allow_remote_media": allow_remote_media}

    # --------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error):
        message, param = _validation_message(error)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException, 404 and 405 included
    async def _starlette_http(request, error):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(GmaivlError)
    async def _gmaivl(request, error):
        status = 400 if isinstance(error, InputError) else 500
        # Boundary messages name the input by role and never quote it, so they may be logged and returned.
        log.info("request refused (%d): %s", status, type(error).__name__)
        return error_response(status, str(error) if status == 400 else "the model could not serve the request")

    @app.exception_handler(Exception)
    async def _unexpected(request, error):
        log.error("internal error: %s", type(error).__name__)  # no message: it might quote input
        return error_response(500, "internal server error")

    if api_key:
        app.add_middleware(_BearerToken, api_key=api_key)
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)

    # --------------------------------------------------------------- helpers
    def check_model(name: str | None):
        if name not in (None, "", served_model_name):
            raise HTTPException(404, f"The model `{name[:64]}` does not exist.")

    def read_images(urls: list[protocol.ImageURL]):
        """Image URLs -> MedicalImages through the request boundary (worker thread)."""
        out = []
        for i, image_url in enumerate(urls, start=1):
            role = f"image {i}"
            source = read_image_url(image_url.url, role=role, max_bytes=_limit(limits, "image_bytes"),
                                    **media_options)
            if isinstance(source, bytes):  # as a file object: short bytes are never taken for a server path
                source = io.BytesIO(source)
            out.append(_to_medical_image(source, role=role, limits=limits, **image_url.reader_options()))
        return out

    async def start(body: protocol.ChatCompletionRequest, http_request: Request) -> Generation:
        arrival = time.monotonic()
        check_model(body.model)
        if not engine_alive(engine):
            raise HTTPException(503, "the engine is not running")
        if body.n != 1:
            raise InputError("n: only n=1 is supported")
        system, turns, urls = chat_turns(body.messages)
        _check_image_count(limits, len(urls))
        if max_waiting is not None and engine.stats().get("waiting", 0) >= max_waiting:
            raise HTTPException(429, f"the server is saturated ({max_waiting} requests waiting); retry later")
        images = await run_in_threadpool(read_images, urls)
        request = await run_in_threadpool(lambda: engine.submit(messages=turns, images=images, system=system,
                                                                **generation_options(body)))
        return Generation(request, arrival, metrics)

    # --------------------------------------------------------------- endpoints
    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, http_request: Request):
        generation = await start(body, http_request)
        request_id, model = protocol.completion_id(), served_model_name
        try:
            first = await generation.next_delta()  # errors raised before any output get their status code
        except BaseException:
            generation.cancel()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(generation, first, request_id, model, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, generation))
        try:
            delta = first
            while delta is not _END:
                delta = await generation.next_delta()
        finally:
            watcher.cancel()
            generation.cancel()
        return protocol.completion(request_id, model, generation.text, generation.finish_reason,
                                   generation.prompt_tokens, generation.completion_tokens)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "gmaivl-rt", "root": served_model_name}]}

    @app.post("/v1/gmaivl/preview")
    async def preview(body: protocol.PreviewRequest):
        """The picture the model would see for an image URL, as a PNG data URI, and what the file says about itself
        (format, modality, body part, size, frames/slices, window), never who the patient is."""
        image = await run_in_threadpool(lambda: read_images([body.image_url])[0])
        return {"image": _png_data_uri(image.pixels), "metadata": safe_metadata(image)}

    @app.get("/health")
    async def health():
        return Response(status_code=200) if engine_alive(engine) else Response(status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _cancel_on_disconnect(http_request: Request, generation: Generation, every_s: float = 0.25):
    while not generation.done:
        if await http_request.is_disconnected():
            generation.cancel()
            return
        await asyncio.sleep(every_s)


def _event(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(generation: Generation, first, request_id: str, model: str, include_usage: bool):
    """Server-sent `chat.completion.chunk` events ending in `data: [DONE]`; a failure sends an error object first.
    A client that goes away cancels the generator, which cancels the engine request (its slot is freed)."""
    created = int(time.time())
    try:
        yield _event(protocol.chunk(request_id, model, created, {"role": "assistant", "content": ""}))
        delta = first
        while delta is not _END:
            if delta:
                yield _event(protocol.chunk(request_id, model, created, {"content": delta}))
            delta = await generation.next_delta()
        yield _event(protocol.chunk(request_id, model, created, {}, generation.finish_reason))
        if include_usage:
            yield _event(protocol.chunk(request_id, model, created, usage_=protocol.usage(
                generation.prompt_tokens, generation.completion_tokens)))
    except GmaivlError as error:
        status = 400 if isinstance(error, InputError) else 500
        log.info("request failed mid-stream (%d): %s", status, type(error).__name__)
        message = str(error) if status == 400 else "the model could not serve the request"
        yield _event(protocol.error_body(message[:MAX_MESSAGE_CHARS], _STATUS_TYPES[status], status))
    except Exception as error:
        log.error("internal error mid-stream: %s", type(error).__name__)
        yield _event(protocol.error_body("internal server error", "InternalServerError", 500))
    finally:
        generation.cancel()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------- images
def safe_metadata(image) -> dict:
    """What the page shows about a `MedicalImage`: whitelisted, non-identifying fields only (MedicalImage carries
    no patient or study identity in the first place)."""
    from gmaivl_rt.medical_io import modality_name

    return {"format": image.source_format, "modality": image.modality,
            "modality_name": modality_name(image.modality) if image.modality else None,
            "body_part": image.body_part, "width": image.width, "height": image.height,
            "source_size": list(image.source_size) if image.source_size else None,
            "index": image.index, "count": image.count, "orientation": image.orientation,
            "pixel_spacing": list(image.pixel_spacing) if image.pixel_spacing else None,
            "window": list(image.window) if image.window else None, "window_name": image.window_name}


def _png_data_uri(pixels) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------------- boundary
def _server_limits(engine, limits, max_images_per_request):
    """The request boundary's `Limits` this server applies: given, else the engine's, else the defaults; with
    `max_images_per_request` overriding its images-per-request ceiling."""
    from dataclasses import replace

    from gmaivl_rt.limits import Limits

    runtime = getattr(engine, "backend", None)
    limits = limits or getattr(engine, "limits", None) or getattr(runtime, "limits", None) or Limits()
    if max_images_per_request is not None:
        limits = replace(limits, max_images_per_request=int(max_images_per_request))
    return limits


def _limit(limits, name: str) -> int:
    return int(getattr(limits, f"max_{name}"))


def _check_image_count(limits, count: int) -> None:
    # Checked before any image is decoded, so a request with a thousand images costs nothing.
    if count > limits.max_images_per_request:
        raise LimitError(f"request has {count} images; the limit is {limits.max_images_per_request} "
                         "(--max-images-per-request)")


def _to_medical_image(source, *, role: str, limits, **reader_options):
    from gmaivl_rt.image_input import to_medical_image

    return to_medical_image(source, role=role, limits=limits, **reader_options)
