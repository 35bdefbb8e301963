"""Error answers in vLLM's shape ({"error": {"message", "type", "param", "code"}}), the one place that decides
what a client is told about a failure: boundary messages (`InputError`) pass through, as they name the input by role
and never quote it; anything else is a generic message, so internals and input never leak."""
from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gmaivl_rt.errors import InputError
from gmaivl_rt.server import protocol

MAX_MESSAGE_CHARS = 300
STATUS_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 429: "TooManyRequests",
                500: "InternalServerError", 503: "ServiceUnavailable"}
# A field name a message may quote; anything else a client sent as a key is named "an unknown field".
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
# Pydantic's names of union members and validators in an error's path: they say nothing to a client.
_PATH_NOISE = ("str", "function-after", "function-before", "TextPart", "ImagePart", "int", "float", "tuple")


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """The error object for `status`, its message cut to MAX_MESSAGE_CHARS (and made encodable: a lone surrogate
    would fail the JSON encoder and turn a 400 into a 500)."""
    message = message[:MAX_MESSAGE_CHARS].encode("utf-8", "replace").decode("utf-8")
    return protocol.error_body(message, STATUS_TYPES.get(status, "Error"), status, param)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def refusal(error: Exception) -> tuple[int, str]:
    """A `GmaivlError` -> (status, message for the client): 400 with the boundary's own message for an InputError
    (LimitError included), else 500 with a message that says nothing about the failure."""
    if isinstance(error, InputError):
        return 400, str(error)
    return 500, "the model could not serve the request"


def _path(loc) -> list[str]:
    parts = []
    for p in loc:
        if p == "body" or (isinstance(p, str) and ("[" in p or p in _PATH_NOISE)):
            continue
        if parts and parts[-1] == p:  # a content part's type tag ('image_url', 'text') before its field of that name
            continue
        if isinstance(p, int) or _FIELD_NAME.match(str(p)):
            parts.append(str(p))
        else:
            parts.append("<field>")
    return parts


def _problem(item: dict, field: str) -> str:
    if item.get("type") == "union_tag_invalid":  # pydantic's message quotes the tag the client sent
        return f"type must be one of {item.get('ctx', {}).get('expected_tags', 'the known part types')}"
    if item.get("type") != "extra_forbidden":
        return item.get("msg", "invalid")
    name = field.rsplit(".", 1)[-1]
    if name in protocol.NOT_IMPLEMENTED or name in protocol.MESSAGE_NOT_IMPLEMENTED:
        return "not supported by this server (only its neutral value, e.g. null, is accepted)"
    return "unknown field (see docs/serving.md for the fields this server takes)"


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """Field paths and pydantic's messages only: `input` values (the request's own data) are never quoted, and a
    field name only when it is a plain identifier."""
    items = []
    for item in error.errors():
        if item.get("type") == "json_invalid":
            return "request body is not valid JSON", None
        items.append((".".join(_path(item.get("loc", ()))) or "body", item))
    # A union (content: a string or a list of parts) reports every branch; the deepest path is the one the client
    # meant, so a problem whose field holds another problem's field is left out.
    fields = {field for field, _ in items}
    kept = [(f, i) for f, i in items if not any(other.startswith(f + ".") for other in fields)] or items
    problems = [f"{field}: {_problem(item, field)}" for field, item in kept]
    param = next((field for field, _ in kept if field != "body"), None)
    return "; ".join(dict.fromkeys(problems)) or "invalid request", param
