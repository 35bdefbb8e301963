"""The OpenAI chat-completions request and response shapes, as vLLM serves them (pydantic models).

Requests are strict: ints are ints (not bools or floats), `stream` is a bool, every string is valid Unicode (a lone
surrogate is refused: no tokenizer or JSON encoder downstream can take it). Unknown fields are refused with a 400
naming them (`http_errors.validation_message`), except `IGNORED_FIELDS`, which clients send harmlessly and this
server ignores on purpose; fields OpenAI defines but this server does not implement (`NOT_IMPLEMENTED`) are
accepted only with their neutral value (null, false, 0, ...) and refused otherwise, naming the field.

Request fields gmaivl-rt adds, all optional: inside `image_url`, `frame`, `slice_index`, `plane` and `window` pick
the picture of a multi-frame DICOM or NIfTI volume and its CT window, as `gmaivl-rt ask` does; vLLM's extra sampling
fields `top_k`, `min_p`, `repetition_penalty` and ours `no_repeat_ngram_size` (see `gmaivl_rt.server.openai`).
Structured output: OpenAI's `response_format` (text, json_object, json_schema) and vLLM's `guided_json`,
`guided_choice`, `guided_regex`; `logprobs` / `top_logprobs` as OpenAI (docs/structured-output.md).
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt, \
    model_validator

def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


# JSON numbers: 1 and 1.0, never true, "1" or NaN / Infinity (Python's json module reads those)
Number = Annotated[Union[int, float], PlainValidator(_number)]

# Fields clients send that change nothing here, ignored on purpose: OpenAI's end-user id and request metadata.
IGNORED_FIELDS = ("user", "metadata")
# OpenAI / vLLM request fields this server does not implement -> their neutral values (accepted and ignored);
# any other value is refused with a 400 naming the field.
NOT_IMPLEMENTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
    "functions": (None, []), "function_call": (None, "none"), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}
# On a message: OpenAI's participant name (ignored), and what an assistant message echoed back from a response
# carries when it used no tools.
MESSAGE_IGNORED_FIELDS = ("name",)
MESSAGE_NOT_IMPLEMENTED = {"tool_calls": (None, []), "function_call": (None,), "refusal": (None,),
                           "audio": (None,), "annotations": (None, [])}


def _neutral(value, neutral: tuple) -> bool:
    """`value` is one of `neutral` (None always is); a bool equals only a bool (False is not 0 here)."""
    return value is None or any(value == n and isinstance(value, bool) == isinstance(n, bool)
                                for n in neutral if n is not None)


def _drop_harmless(data, ignored: tuple, not_implemented: dict):
    """A request object without the ignored fields and the not-implemented fields at their neutral value; what
    remains of the unknown fields is then refused by `extra="forbid"`."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items()
            if k not in ignored and not (k in not_implemented and _neutral(v, not_implemented[k]))}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: Text
    detail: Text | None = None  # OpenAI's resolution hint: ignored (the model's preprocessing decides)
    frame: StrictInt | None = None
    slice_index: StrictInt | None = None
    plane: Literal["axial", "coronal", "sagittal"] | None = None
    window: Text | tuple[Number, Number] | None = None

    def reader_options(self) -> dict:
        """The keyword arguments `gmaivl_rt.medical.reader` readers take, for the ones the request set."""
        options = {"frame": self.frame, "slice_index": self.slice_index, "plane": self.plane, "window": self.window}
        return {k: v for k, v in options.items() if v is not None}


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _harmless(cls, data):
        return _drop_harmless(data, MESSAGE_IGNORED_FIELDS, MESSAGE_NOT_IMPLEMENTED)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's; usage is sent once, at the end


class JSONSchemaFormat(_Strict):
    name: Text
    schema_: dict = Field(alias="schema")  # the JSON Schema (checked and compiled by gmaivl_rt.model.constraint)
    strict: StrictBool | None = None  # always enforced here, whatever it says
    description: Text | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat],
                           Field(discriminator="type")]


class ChatCompletionRequest(_Strict):
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None  # its range: gmaivl_rt.model.sampling.seeded_generator
    stop: Text | list[Text] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    # vLLM's extra sampling fields, and ours
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    no_repeat_ngram_size: StrictInt | None = None
    # structured output (OpenAI's, then vLLM's fields) and logprobs
    response_format: ResponseFormat | None = None
    guided_json: dict | Text | None = None
    guided_choice: list[Text] | None = None
    guided_regex: Text | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _harmless(cls, data):
        return _drop_harmless(data, IGNORED_FIELDS, NOT_IMPLEMENTED)


class PreviewRequest(_Strict):
    """POST /v1/gmaivl/preview: the picture the model would see for `image_url`."""
    image_url: ImageURL


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, logprobs: dict | None = None, constraint_satisfied: bool | None = None) -> dict:
    """A non-streamed `chat.completion` object. logprobs: OpenAI's `{"content": [...]}` (`logprobs_content`);
    constraint_satisfied: with a constraint, whether the answer satisfies it (false: cut by max_tokens, partial;
    left out without one)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": finish_reason}
    if constraint_satisfied is not None:
        choice["constraint_satisfied"] = constraint_satisfied
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def answer_details(request, tokenizer) -> dict:
    """What an engine request adds to its completion: `logprobs` (OpenAI's shape, when asked for) and
    `constraint_satisfied` (when it had a constraint), as `completion` takes them."""
    out = {}
    if getattr(request, "top_logprobs", None) is not None:
        out["logprobs"] = {"content": logprobs_content(request.logprobs, tokenizer)}
    if getattr(request, "constraint_complete", None) is not None:
        out["constraint_satisfied"] = bool(request.constraint_complete)
    return out


def _token_entry(token: int, logprob: float, tokenizer) -> dict:
    text = tokenizer.decode([token], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}


def logprobs_content(entries: list, tokenizer) -> list[dict]:
    """`gmaivl_rt.model.sampling.TokenLogprob`s -> OpenAI's logprobs content: per token {"token", "logprob",
    "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]} (a token as the tokenizer decodes it alone;
    bytes of that text, as vLLM gives them)."""
    return [{**_token_entry(e.token, e.logprob, tokenizer),
             "top_logprobs": [_token_entry(t, v, tokenizer) for t, v in e.top]} for e in entries]


def chunk(request_id: str, model: str, created: int, delta: dict | None = None, finish_reason: str | None = None,
          usage_: dict | None = None, logprobs: dict | None = None, constraint_satisfied: bool | None = None) -> dict:
    """One `chat.completion.chunk`; with `usage_` and no delta it is the final usage chunk (no choices).
    logprobs: the `{"content": [...]}` of the tokens this chunk carries; constraint_satisfied: on the last chunk
    of a constrained answer."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    if choices and constraint_satisfied is not None:
        choices[0]["constraint_satisfied"] = constraint_satisfied
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """vLLM's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
