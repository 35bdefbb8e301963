"""`create_app(engine, ...)`: the OpenAI-compatible HTTP server over a `gmaivl_rt.Engine`, in vLLM's shapes.

A thin layer: requests are turned into the engine's `submit(messages=, images=, system=, **generation)`; images go
through the request boundary (`gmaivl_rt.medical.convert.to_medical_image`) in the decode pool of `decoding`, never
on the event loop; the chat template, limits and decoding are the engine's. What this layer adds is HTTP: JSON and SSE
shapes, status codes, authentication, body size, media URLs, metrics and the web page.

Status codes: 400 bad JSON / parameters / images (the boundary's `InputError`, message passed through: it names the
input by role and never echoes bytes or header values), an unknown or unimplemented field (named), or a Host header
outside `allowed_hosts`, 401 missing or wrong bearer token (with `api_key`), 404 an
unknown model name or path, 413 a body over `max_request_bytes` or images over the per-request decode budget, 429
when `max_waiting` requests already wait (images being read, or queued in the engine: `generation.Admission`,
counted atomically; without `max_waiting` requests queue in the engine until a slot is free) or the server's decode
budget has no room (`decoding`: both read from the image headers before decoding, with Retry-After), 503 engine
dead.

This module wires the routes; the pieces are by idea: `openai` (requests -> the engine's arguments), `generation`
and `sse` (answers, streamed or not), `boundary` (limits and images), `media` and `remote_media` (image URLs),
`preview`, `middleware` (security headers, Host check, body limit, bearer token, the last-resort 500), `http_errors`.
"""
from __future__ import annotations

import logging
import mimetypes
import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gmaivl_rt.errors import GmaivlError, InputError
from gmaivl_rt.server import protocol
from gmaivl_rt.server.audit import AuditLog
from gmaivl_rt.server.body import parsed_body
from gmaivl_rt.server.boundary import check_image_count, decode_images, receive_images, server_limits
from gmaivl_rt.server.decoding import BudgetRefusal, ImageDecoding
from gmaivl_rt.server.generation import Admission, Generation, LoopDeltas, begin_answer, engine_alive, \
    finish_unstreamed
from gmaivl_rt.server.http_errors import error_response, refusal, validation_message
from gmaivl_rt.server.metrics import OutcomeCounter, RequestOutcome, ServerMetrics, current_outcome
from gmaivl_rt.server.middleware import AllowedHosts, BearerToken, BodyLimit, InternalErrors, SecurityHeaders
from gmaivl_rt.server.openai import chat_turns, generation_options
from gmaivl_rt.server.preview import preview as preview_body
from gmaivl_rt.server.sse import sse_events

log = logging.getLogger("gmaivl_rt.server")
STATIC = Path(__file__).parent / "static"


def create_app(engine, *, served_model_name: str = "gmaivl", api_key: str | None = None,
               max_request_bytes: int = 64 * 2**20, max_images_per_request: int | None = None,
               allowed_local_media_path=None, allow_remote_media: bool = False, allowed_media_domains=None,
               remote_media_timeout_s: float = 10.0, max_waiting: int | None = None, limits=None, allowed_hosts=None,
               audit_log=None, decode_budget=None, dicomweb=None, dicomweb_auth=None):
    """The ASGI app serving `engine` (a `gmaivl_rt.Engine`). `limits`: the request boundary's `Limits` (default:
    the engine's); `max_images_per_request` overrides its images-per-request limit. `api_key`: None (open) or a
    non-empty key (an empty one is refused: InputError). `allowed_hosts`: Host header names answered (None: any;
    `gmaivl-rt serve` passes the bound host and localhost). `allowed_media_domains`: with `allow_remote_media`, the
    only hosts fetched (None: any public address; `gmaivl_rt.server.remote_media`), each fetch within
    `remote_media_timeout_s`. `audit_log`: None, or a file path receiving one JSON line per /v1 request
    (`gmaivl_rt.server.audit`; created 0600 at once, InputError if it cannot be). `decode_budget`: a
    `gmaivl_rt.limits.DecodeBudget` (default: its defaults), what image decoding may cost (`server.decoding`).
    `dicomweb`: a DICOMweb archive's root URL: adds the archive routes (`gmaivl_rt.server.archive`: browse
    studies, ask about one, write the answer back as an SR), with `dicomweb_auth` or the archive credentials of the
    environment (`gmaivl_rt.medical.dicomweb.auth_from_env`).
    See the module doc for status codes. Endpoints: POST /v1/chat/completions, GET /v1/models,
    POST /v1/gmaivl/preview, GET /health, /metrics, /."""
    if api_key is not None and not str(api_key).strip():
        raise InputError("api_key is empty: give a real key, or none for an open server")
    limits = server_limits(engine, limits, max_images_per_request)
    metrics = ServerMetrics(engine)
    audit = AuditLog(audit_log) if audit_log is not None else None
    admission = Admission(engine, max_waiting)
    decoding = ImageDecoding(decode_budget)
    metrics.watch_decoding(decoding)
    app = FastAPI(title="gmaivl-rt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    app.state.decoding = decoding
    app.router.on_shutdown.append(decoding.close)
    media_options = {"allowed_local_media_path": allowed_local_media_path, "allow_remote_media": allow_remote_media,
                     "allowed_media_domains": allowed_media_domains, "remote_timeout_s": remote_media_timeout_s}

    # --------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error):
        message, param = validation_message(error)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException, 404 and 405 included
    async def _starlette_http(request, error):
        response = error_response(error.status_code, str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(BudgetRefusal)
    async def _budget(request, error):
        log.info("request refused (%d): image decode budget", error.status)
        response = error_response(error.status, error.message)
        if error.retry_after_s is not None:
            response.headers["Retry-After"] = str(error.retry_after_s)
        return response

    @app.exception_handler(GmaivlError)
    async def _gmaivl(request, error):
        status, message = refusal(error)
        # Boundary messages name the input by role and never quote it, so they may be logged and returned.
        log.info("request refused (%d): %s", status, type(error).__name__)
        return error_response(status, message)

    # Anything else: `InternalErrors` (a 500 without message or traceback; the connection stays usable).
    # Middleware, innermost first (each add wraps the ones before).
    if api_key is not None:
        app.add_middleware(BearerToken, api_key=api_key)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(InternalErrors)
    if allowed_hosts is not None:
        app.add_middleware(AllowedHosts, hosts=allowed_hosts)
    app.add_middleware(SecurityHeaders)
    # outermost: every answer, refusals included, is counted (and audited)
    app.add_middleware(OutcomeCounter, metrics=metrics, audit=audit)

    # --------------------------------------------------------------- helpers
    def audited_images(urls) -> list | None:
        """The list `read_images` appends image digests to: the audit's, for the request being served; None (no
        hashing on the request path) when there is no audit log."""
        if audit is None:
            return None
        outcome = current_outcome() or RequestOutcome()  # none: a path no middleware watches
        outcome.image_count = len(urls)
        return outcome.image_digests

    async def decoded_images(urls, digests) -> tuple[list, object]:
        """Image URLs -> (MedicalImages, their budget reservation): received and their headers read in a worker
        thread, refused from the headers (BudgetRefusal: 413 / 429) before anything is decoded, then decoded in the
        decode pool. The reservation is released once the pictures are freed (or by the caller when it is done)."""
        received = await run_in_threadpool(receive_images, urls, limits, digests, decoding.check_request,
                                           **media_options)
        reservation = decoding.admit([image.pixels for image in received])
        images = await decoding.decode(lambda: decode_images(received, limits), reservation)
        reservation.release_when_freed([image.pixels for image in images])
        return images, reservation

    def check_model(name: str | None):
        if name not in (None, "", served_model_name):
            raise HTTPException(404, f"The model `{name[:64]}` does not exist.")

    async def start(body: protocol.ChatCompletionRequest, http_request: Request) -> Generation:
        arrival = time.monotonic()
        check_model(body.model)
        if not engine_alive(engine):
            raise HTTPException(503, "the engine is not running")
        if body.n != 1:
            raise InputError("n: only n=1 is supported")
        system, turns, urls = chat_turns(body.messages)
        digests = audited_images(urls)
        check_image_count(limits, len(urls))
        ticket = admission.admit()  # counted from here (images being read) until the engine queues it
        if ticket is None:
            raise HTTPException(429, f"the server is saturated ({max_waiting} requests waiting); retry later",
                                headers={"Retry-After": "1"})
        reservation = None
        try:
            decode_started = time.monotonic()
            images, reservation = await decoded_images(urls, digests) if urls else ([], None)
            if urls:
                metrics.image_decode_time.observe(time.monotonic() - decode_started)
            deltas = LoopDeltas()
            request = await run_in_threadpool(ticket.submit, lambda: engine.submit(
                messages=turns, images=images, system=system, sink=deltas.sink, **generation_options(body)))
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        finally:
            ticket.release()  # a no-op once submitted
        generation = Generation(request, deltas, arrival, metrics)
        if reservation is not None:  # at the latest when the request ends (its pictures may outlive it in a cycle)
            generation.on_end.append(reservation.release)
        return generation

    # --------------------------------------------------------------- endpoints
    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        body = await parsed_body(http_request, protocol.ChatCompletionRequest)
        generation = await start(body, http_request)
        model = served_model_name
        request_id, first = await begin_answer(generation)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse_events(generation, first, request_id, model, include_usage, engine.tokenizer),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await finish_unstreamed(http_request, generation, first)
        return protocol.completion(request_id, model, generation.text, generation.finish_reason,
                                   generation.prompt_tokens, generation.completion_tokens,
                                   **protocol.answer_details(generation.request, engine.tokenizer))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "gmaivl-rt", "root": served_model_name}]}

    @app.post("/v1/gmaivl/preview")
    async def preview(http_request: Request):
        """The picture the model would see for an image URL, as a PNG data URI, and what the file says about itself
        (format, modality, body part, size, frames/slices, window), never who the patient is."""
        body = await parsed_body(http_request, protocol.PreviewRequest)
        digests = audited_images([body.image_url])
        images, reservation = await decoded_images([body.image_url], digests)
        try:
            return preview_body(images[0])
        finally:
            reservation.release()

    @app.get("/health")
    async def health():
        return Response(status_code=200) if engine_alive(engine) else Response(status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The page and its files are read once and answered from memory on the event loop: no thread pool (the decode
    # pool, or the threads streams and image intake use) stands between a client and them.
    page_files = {path.name: (path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")
                  for path in sorted(STATIC.iterdir()) if path.is_file()}

    @app.get("/")
    async def page():
        return Response(page_files["index.html"][0], media_type="text/html")

    @app.api_route("/static/{name}", methods=["GET", "HEAD"])
    async def static(name: str):
        if name not in page_files:
            raise HTTPException(404, "Not Found")
        content, media_type = page_files[name]
        return Response(content, media_type=media_type)

    if dicomweb is not None:
        from gmaivl_rt.server.archive import ArchiveService, add_archive_routes

        add_archive_routes(app, engine, ArchiveService(dicomweb, limits, dicomweb_auth),
                           served_model_name=served_model_name, admission=admission, decoding=decoding,
                           metrics=metrics, max_waiting=max_waiting)
    return app
