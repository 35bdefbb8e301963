"""The OpenAI chat-completions request and response shapes, as vLLM serves them (pydantic models).

Request fields gmaivl-rt adds, all optional: inside `image_url`, `frame`, `slice_index`, `plane` and `window` pick
the picture of a multi-frame DICOM or NIfTI volume and its CT window, as `gmaivl-rt ask` does.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    url: str
    detail: str | None = None
    frame: int | None = None
    slice_index: int | None = None
    plane: Literal["axial", "coronal", "sagittal"] | None = None
    window: str | tuple[float, float] | None = None

    def reader_options(self) -> dict:
        """The keyword arguments `gmaivl_rt.medical.reader` readers take, for the ones the request set."""
        options = {"frame": self.frame, "slice_index": self.slice_index, "plane": self.plane, "window": self.window}
        return {k: v for k, v in options.items() if v is not None}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields are ignored, as vLLM does (clients send e.g. `user`, `logprobs: false`).
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class PreviewRequest(BaseModel):
    """POST /v1/gmaivl/preview: the picture the model would see for `image_url`."""
    image_url: ImageURL


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """A non-streamed `chat.completion` object."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(request_id: str, model: str, created: int, delta: dict | None = None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """One `chat.completion.chunk`; with `usage_` and no delta it is the final usage chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """vLLM's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
