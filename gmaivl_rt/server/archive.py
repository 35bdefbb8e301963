"""`gmaivl-rt serve --dicomweb URL`: asking about a study in a DICOMweb archive instead of an upload, browsing the
archive's studies for the page, and writing answers back as Structured Reports (docs/hospital.md).

Routes (under /v1, so behind the same API key):

* `GET /v1/gmaivl/archive/studies?limit=&offset=`: one page of studies, only what is needed to choose one
  (`gmaivl_rt.medical.dicomweb.browse_studies`: UIDs, modality codes, dates, counts; no patient value).
* `POST /v1/gmaivl/archive/series {"study": UID}`: a study's series (`browse_series`). UIDs travel in bodies, never
  in paths or query strings, so the access log never holds one.
* `POST /v1/gmaivl/archive/chat/completions`: a chat completion request (the same fields as /v1/chat/completions,
  text-only messages) plus `dicomweb: {study, series?, instance?, frame?, slice_index?, plane?, window?}` naming the
  image and `write_sr` (store the answer in the study as an SR). Streamed (`stream: true`) as /v1/chat/completions
  streams, the stored report then in a last chunk (`choices: []`, `report`) before `[DONE]`. The image is chosen
  and read by `fetch_study` (the choice rule, the request limits before download), counted in the server's decode budget
  before its pixel data is downloaded (413 / 429 as for uploads), read in the decode pool, admitted by the same
  `max_waiting` ceiling, and answered by the engine; the report is written by `gmaivl_rt.runtime.hospital.file_report`,
  the one place `gmaivl-rt ask --write-sr` writes it too.
* `POST /v1/gmaivl/archive/preview {"dicomweb": {...}}`: the picture the model would see for that choice, as
  `/v1/gmaivl/preview` gives it for an upload (a PNG data URI through the same reader and windowing, and metadata
  from closed vocabularies only: no header value), read under the same limits and decode budget.

Bodies are read by `server.body.parsed_body`, as /v1/chat/completions reads them: a large one (long messages) is
parsed in a worker thread, never on the event loop.

Archive credentials come from the environment variables `gmaivl-rt ask --dicomweb` reads (`auth_from_env`), never
the command line. Errors are 400s naming the field (`dicomweb`, `dicomweb.study`, `write_sr`, ...) with the
archive's own one-line message, which never quotes a UID, URL or header value.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Annotated, Literal

from fastapi import HTTPException, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, StrictInt
from starlette.concurrency import run_in_threadpool

from gmaivl_rt.errors import InputError, ModelError
from gmaivl_rt.server import protocol
from gmaivl_rt.server.body import parsed_body
from gmaivl_rt.server.generation import Generation, LoopDeltas, begin_answer, engine_alive, finish_unstreamed
from gmaivl_rt.server.http_errors import error_response
from gmaivl_rt.server.metrics import current_outcome
from gmaivl_rt.server.openai import chat_turns, generation_options

log = logging.getLogger("gmaivl_rt.server")

STUDIES_PATH = "/v1/gmaivl/archive/studies"
SERIES_PATH = "/v1/gmaivl/archive/series"
ASK_PATH = "/v1/gmaivl/archive/chat/completions"
PREVIEW_PATH = "/v1/gmaivl/archive/preview"


def _uid(text: str) -> str:
    from gmaivl_rt.medical.dicomweb import _is_uid

    if not _is_uid(text):
        raise ValueError("not a DICOM UID (digits and dots, at most 64)")
    return text


UID = Annotated[str, AfterValidator(_uid)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArchiveImage(_Strict):
    """The archive image a request asks about, and the reader options an `image_url` takes."""
    study: UID
    series: UID | None = None
    instance: UID | None = None
    frame: StrictInt | None = None
    slice_index: StrictInt | None = None
    plane: Literal["axial", "coronal", "sagittal"] | None = None
    window: protocol.Text | tuple[protocol.Number, protocol.Number] | None = None

    def reader_options(self) -> dict:
        options = {"frame": self.frame, "slice_index": self.slice_index, "plane": self.plane, "window": self.window}
        return {k: v for k, v in options.items() if v is not None}


class ArchiveChatRequest(protocol.ChatCompletionRequest):
    """POST /v1/gmaivl/archive/chat/completions: a chat completion about `dicomweb`'s image."""
    dicomweb: ArchiveImage
    write_sr: StrictBool = False


class SeriesRequest(_Strict):
    study: UID


class ArchivePreviewRequest(_Strict):
    dicomweb: ArchiveImage


class ArchiveService:
    """The archive one server reads: its DICOMweb root and credentials (from the environment by default, read
    once at start: a contradictory set stops the start), the request limits."""

    def __init__(self, url: str, limits, auth=None):
        from gmaivl_rt.medical.dicomweb import Archive, auth_from_env

        self.url, self.limits = url, limits
        self.auth = auth if auth is not None else auth_from_env()
        Archive(url, auth=self.auth, limits=limits)  # checks the extra and the URL now, not at the first request

    def archive(self):
        from gmaivl_rt.medical.dicomweb import Archive

        return Archive(self.url, auth=self.auth, limits=self.limits)

    def ref(self, image: ArchiveImage):
        from gmaivl_rt.medical.dicomweb import DicomWebRef

        return DicomWebRef(self.url, image.study, image.series, image.instance, auth=self.auth)


def _refused(error: InputError | ModelError, param: str):
    log.info("archive request refused (400): %s", type(error).__name__)  # the type only: never a UID
    return error_response(400, str(error), param)


def add_archive_routes(app, engine, service: ArchiveService, *, served_model_name: str, admission, decoding,
                       metrics, max_waiting) -> None:
    """Register the archive routes (module doc) on `app`, sharing the server's admission, decode budget and
    metrics."""

    @functools.lru_cache(maxsize=1)
    def algorithm():
        from gmaivl_rt.runtime.hospital import model_algorithm

        return model_algorithm(engine.backend, name=served_model_name)

    async def read_picture(choice: ArchiveImage, reserved: list):
        """The archive image `choice` names -> (its DicomWebRef, the FetchedImage, the decoded MedicalImage): chosen
        and fetched by `fetch_study` (limits from QIDO metadata before download), counted in the decode budget
        before its pixel data is downloaded (the reservation appended to `reserved`, for the caller to release),
        decoded in the decode pool. InputError / LimitError for the archive's refusals; BudgetRefusal (413 / 429)."""
        from gmaivl_rt.medical.dicomweb import fetch_study

        ref = service.ref(choice)
        fetched = await run_in_threadpool(fetch_study, ref, service.limits,
                                          admit=lambda values: reserved.append(decoding.admit([values])))
        image = await decoding.decode(functools.partial(
            fetched.read, limits=service.limits, **choice.reader_options()), reserved[0])
        return ref, fetched, image

    @app.get(STUDIES_PATH)
    async def studies(limit: int = Query(50, ge=1, le=100), offset: int = Query(0, ge=0, le=1_000_000)):
        from gmaivl_rt.medical.dicomweb import browse_studies

        try:
            found = await run_in_threadpool(browse_studies, service.archive(), limit, offset)
        except InputError as error:
            return _refused(error, "dicomweb")
        return {"object": "list", "offset": offset, "limit": limit, "data": found}

    @app.post(SERIES_PATH)
    async def series(http_request: Request):
        from gmaivl_rt.medical.dicomweb import browse_series

        body = await parsed_body(http_request, SeriesRequest)
        try:
            found = await run_in_threadpool(browse_series, service.archive(), body.study)
        except InputError as error:
            return _refused(error, "study")
        return {"object": "list", "data": found}

    @app.post(ASK_PATH)
    async def ask(http_request: Request):
        arrival = time.monotonic()
        body = await parsed_body(http_request, ArchiveChatRequest)
        if body.model not in (None, "", served_model_name):
            raise HTTPException(404, f"The model `{body.model[:64]}` does not exist.")
        if not engine_alive(engine):
            raise HTTPException(503, "the engine is not running")
        if body.n != 1:
            raise InputError("n: only n=1 is supported")
        system, turns, urls = chat_turns(body.messages)
        if urls:
            return error_response(400, "messages: the image comes from the archive (dicomweb), not an image_url "
                                       "part", "messages")
        if body.write_sr:  # a model the report cannot name: say so before the archive is read or a token made
            try:
                algorithm()
            except ModelError as error:
                return _refused(error, "write_sr")
        question = turns[-1]["content"][-1]["text"]
        turns[-1]["content"] = _with_image_slot(turns[-1]["content"])
        options = generation_options(body)
        if (outcome := current_outcome()) is not None:
            outcome.image_count = 1
        ticket = admission.admit()
        if ticket is None:
            raise HTTPException(429, f"the server is saturated ({max_waiting} requests waiting); retry later",
                                headers={"Retry-After": "1"})
        reserved = []
        try:
            try:
                ref, fetched, image = await read_picture(body.dicomweb, reserved)
            except InputError as error:
                return _refused(error, "dicomweb")
            reserved[0].release_when_freed([image.pixels])
            deltas = LoopDeltas()
            request = await run_in_threadpool(ticket.submit, lambda: engine.submit(
                messages=turns, images=[image], system=system, sink=deltas.sink, **options))
        except BaseException:
            for reservation in reserved:
                reservation.release()
            raise
        finally:
            ticket.release()  # a no-op once submitted
        generation = Generation(request, deltas, arrival, metrics)
        generation.on_end.append(reserved[0].release)
        request_id, first = await begin_answer(generation)

        async def write_report() -> dict:
            """The finished answer's report, stored in the study (`file_report`; InputError when refused)."""
            from gmaivl_rt.runtime.hospital import answer_findings, file_report

            constraint = options.get("constraint")
            findings = answer_findings(generation.text, generation.request.constraint_complete) \
                if constraint is not None and constraint.kind == "json_schema" else None
            made = await run_in_threadpool(lambda: file_report(ref, fetched.sources, question, generation.text,
                                                               algorithm(), limits=service.limits, write_sr=True,
                                                               findings=findings))
            return {"sop_instance_uid": made.report_uid, "stored": made.stored}

        if body.stream:
            from fastapi.responses import StreamingResponse

            from gmaivl_rt.server.sse import sse_events

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(generation, first, request_id, served_model_name, include_usage, engine.tokenizer)
            return StreamingResponse(_with_report(events, generation, request_id, served_model_name,
                                                  write_report if body.write_sr else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await finish_unstreamed(http_request, generation, first)
        reply = protocol.completion(request_id, served_model_name, generation.text, generation.finish_reason,
                                    generation.prompt_tokens, generation.completion_tokens,
                                    **protocol.answer_details(generation.request, engine.tokenizer))
        reply["report"] = None
        if body.write_sr:
            try:
                reply["report"] = await write_report()
            except InputError as error:
                return _refused(error, "write_sr")
        return reply

    @app.post(PREVIEW_PATH)
    async def preview(http_request: Request):
        from gmaivl_rt.server.preview import preview as preview_body

        body = await parsed_body(http_request, ArchivePreviewRequest)
        reserved = []
        try:
            try:
                _, _, image = await read_picture(body.dicomweb, reserved)
            except InputError as error:
                return _refused(error, "dicomweb")
            return preview_body(image)
        finally:
            for reservation in reserved:
                reservation.release()


async def _with_report(events, generation, request_id: str, model: str, write_report):
    """A streamed answer's server-sent events (`sse_events`), with, when `write_report` is given and the answer
    ended normally, the stored report's chunk (`choices: []`, `report`), or a write_sr error object, before the
    closing `[DONE]`."""
    from gmaivl_rt.server.http_errors import error_body
    from gmaivl_rt.server.sse import DONE, event

    async for piece in events:
        if piece != DONE:
            yield piece
            continue
        if write_report is not None and generation.outcome == "success":
            try:
                report = await write_report()
            except InputError as error:
                log.info("archive report refused mid-stream: %s", type(error).__name__)
                yield event(error_body(400, str(error), "write_sr"))
            else:
                yield event({"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model, "choices": [], "report": report})
        yield piece


def _with_image_slot(content: list[dict]) -> list[dict]:
    """A user turn's parts with one image slot first, as `chat_turns` places an uploaded image."""
    from gmaivl_rt.runtime.request import image_slots

    return image_slots(1) + content
