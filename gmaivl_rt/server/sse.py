"""Streaming answers: server-sent `chat.completion.chunk` events in OpenAI's (and vLLM's) shape."""
from __future__ import annotations

import json
import logging
import time

from gmaivl_rt.errors import GmaivlError
from gmaivl_rt.server import protocol
from gmaivl_rt.server.generation import END, Generation
from gmaivl_rt.server.http_errors import error_body, refusal

log = logging.getLogger("gmaivl_rt.server")
DONE = "data: [DONE]\n\n"  # the event that closes every stream


def event(obj) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def sse_events(generation: Generation, first, request_id: str, model: str, include_usage: bool,
                     tokenizer=None):
    """Server-sent `chat.completion.chunk` events ending in `data: [DONE]`; a failure sends an error object first.
    A client that goes away cancels the generator, which cancels the engine request (its slot is freed).
    With logprobs asked for, each chunk carries those of the tokens produced since the previous one (their text
    may still be held back, e.g. a possible stop string), the last chunk the rest (`tokenizer` renders them)."""
    created = int(time.time())
    request, sent = generation.request, 0

    def new_logprobs():
        nonlocal sent
        if getattr(request, "top_logprobs", None) is None or tokenizer is None:
            return None
        entries = request.logprobs[sent:]
        sent += len(entries)
        return {"content": protocol.logprobs_content(entries, tokenizer)}

    try:
        yield event(protocol.chunk(request_id, model, created, {"role": "assistant", "content": ""}))
        delta = first
        while delta is not END:
            if delta:
                yield event(protocol.chunk(request_id, model, created, {"content": delta}, logprobs=new_logprobs()))
            delta = await generation.next_delta()
        yield event(protocol.chunk(request_id, model, created, {}, generation.finish_reason, logprobs=new_logprobs(),
                                   constraint_satisfied=getattr(request, "constraint_complete", None)))
        if include_usage:
            yield event(protocol.chunk(request_id, model, created, usage_=protocol.usage(
                generation.prompt_tokens, generation.completion_tokens)))
    except GmaivlError as error:
        status, message = refusal(error)
        log.info("request failed mid-stream (%d): %s", status, type(error).__name__)
        yield event(error_body(status, message))
    except Exception as error:
        log.error("internal error mid-stream: %s", type(error).__name__)
        yield event(error_body(500, "internal server error"))
    finally:
        generation.cancel()
    yield DONE

