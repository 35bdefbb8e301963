"""JSON request bodies -> the `protocol` models, with FastAPI's own errors (so `http_errors.validation_message`
words them as for any other route), and never a large one parsed on the event loop.

A body of `OFF_LOOP_BYTES` or more (an inline image: up to `--max-request-bytes`, 64 MiB by default) is parsed and
validated in a worker thread, so the page, /health and running streams are not held up while it is read. It is
parsed by pydantic's own JSON reader (`model_validate_json`), which holds the interpreter lock for far less of the
work than `json.loads` (a 60 MB body: the event loop's longest pause 0.07 s against 0.19 s). A body it refuses (bad
JSON, but also a lone surrogate escape, a byte order mark or another UTF encoding, which `json.loads` reads) is read
again the way FastAPI reads it, so every request gets the answer it got when FastAPI parsed it, a refusal or not.
"""
from __future__ import annotations

import email.message
import json

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

OFF_LOOP_BYTES = 256 * 1024


async def parsed_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The request's JSON body as `model`; RequestValidationError (a 400 naming the fields) or HTTPException 400
    as FastAPI raises them for a body parameter. Bodies of OFF_LOOP_BYTES or more are parsed in a worker thread."""
    raw = await request.body()
    content_type = request.headers.get("content-type")
    if len(raw) >= OFF_LOOP_BYTES:
        return await run_in_threadpool(parse_body, raw, content_type, model)
    return parse_body(raw, content_type, model)


def parse_body(raw: bytes, content_type: str | None, model: type[BaseModel]) -> BaseModel:
    """`raw` (a request body with its Content-Type header, None if absent) -> `model`, as FastAPI validates a body
    parameter: JSON when the type is application/json (or +json), else the bytes themselves (refused)."""
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    data = raw
    if _is_json(content_type):
        try:
            return model.model_validate_json(raw)
        except ValidationError:  # refused: read again as FastAPI reads it, for FastAPI's own answer
            data = _json_as_fastapi_reads_it(raw)
    try:
        return model.model_validate(data, from_attributes=True)  # FastAPI's validation of a body parameter
    except ValidationError as error:
        raise RequestValidationError([{**item, "loc": ("body", *item["loc"])}
                                      for item in error.errors(include_url=False)]) from None


def _is_json(content_type: str | None) -> bool:
    if not content_type:  # FastAPI's strict_content_type: a body without a type is not taken for JSON
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _json_as_fastapi_reads_it(raw: bytes):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", error.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": error.msg}}]) from None
    except Exception:  # not text in any UTF encoding
        raise HTTPException(400, "There was an error parsing the body") from None
