"""Error answers in vLLM's shape ({"error": {"message", "type", "param", "code"}}), the one place that decides
what a client is told about a failure: boundary messages (`InputError`) pass through, as they name the input by role
and never quote it; anything else is a generic message, so internals and input never leak."""
from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gmaivl_rt.errors import InputError
from gmaivl_rt.server import protocol

MAX_MESSAGE_CHARS = 300
STATUS_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 429: "TooManyRequests",
                500: "InternalServerError", 503: "ServiceUnavailable"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """The error object for `status`, its message cut to MAX_MESSAGE_CHARS."""
    return protocol.error_body(message[:MAX_MESSAGE_CHARS], STATUS_TYPES.get(status, "Error"), status, param)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def refusal(error: Exception) -> tuple[int, str]:
    """A `GmaivlError` -> (status, message for the client): 400 with the boundary's own message for an InputError
    (LimitError included), else 500 with a message that says nothing about the failure."""
    if isinstance(error, InputError):
        return 400, str(error)
    return 500, "the model could not serve the request"


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
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
