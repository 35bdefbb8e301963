"""One request inside the engine: `Request`, the handle `Engine.submit` returns (text deltas, result, cancel), and
`Sequence`, what the scheduler keeps for it (token ids, images, decoding state, KV blocks, streamed text).
`sequence_from_request` turns the runtime's checked `PreparedRequest` into a `Sequence`."""
from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from gmaivl_rt.model.sampling import SAMPLING_OPTIONS, SamplingParams, StopRule
from gmaivl_rt.runtime.base import cut_at_stop
from gmaivl_rt.runtime.tokenizer import IncrementalDetokenizer

END_OF_ANSWER = object()  # the last item of a request's delta stream (its iterator and `sink` see it)


class Request:
    """One submitted question. Iterate it for text deltas (blocks until each arrives); `result(timeout)` waits
    for the whole answer (str); `cancel()` stops it and frees its slot and KV blocks.
    prompt_tokens, generated_tokens: counts; token_ids: the generated ids (eos included); finish_reason: None
    while running, then "stop" | "length" | "cancelled" | "error"; arrival_time (submit), scheduled_time (first
    admitted to a batch), first_token_time (first token produced), finish_time: time.time() stamps (None until
    reached); logprobs: a `gmaivl_rt.model.sampling.TokenLogprob` per generated token (with `logprobs=True`);
    constraint_complete: with a constraint (json_schema / choice / regex), whether the answer satisfies it (False
    after "length": partial). Iterate a request once.
    The text is made as it is read: a request with a sink, or iterated, or whose `text` was asked for, is streamed
    (its new text decoded every step from then on); one only waited on (`result()`) is decoded once, when it ends
    (the same answer, one delta: the engine's per-step work follows who reads). Stop strings are looked for every
    step either way.
    engine: what runs it (its `wake()` is called on cancel); sink: called with every delta and END_OF_ANSWER, from
    the engine's threads; a sink that raises is dropped and the request cancelled (its reader is gone)."""

    def __init__(self, engine, request_id: int, sink=None):
        self.id, self._engine = request_id, engine
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list = []  # a sampling.TokenLogprob per generated token, when logprobs were asked for
        self.top_logprobs: int | None = None  # None: no logprobs asked for
        self.constraint_complete: bool | None = None  # with a constraint: the answer so far satisfies it
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.arrival_time = time.time()
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.cancel_requested = False
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()  # a put is ~20x cheaper than Queue's (its locks)
        self._sink = sink
        self.streaming = sink is not None  # someone reads the deltas as they come: stream the text every step
        self._text: list[str] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ user side
    def __iter__(self):
        self.streaming = True  # the scheduler streams from its next step on (a finished request: all is queued)
        while True:
            item = self._deltas.get()
            if item is END_OF_ANSWER:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> str:
        """The whole answer; raises the request's error (InputError, LimitError, ...) if it failed, TimeoutError
        when it is not done within `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} is not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return "".join(self._text)

    def cancel(self) -> None:
        """Stop generating; the answer so far stays in result(). Frees the slot and KV blocks at the next step."""
        self.cancel_requested = True
        self._engine.wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def text(self) -> str:
        """The text streamed so far (the whole answer once done); asking for it streams the request from the next
        step on (until then, a request nobody streams has shown no text)."""
        self.streaming = True
        return "".join(self._text)

    # ------------------------------------------------------------------ engine side (this module and fail_request)
    def _push(self, delta: str) -> None:
        if not delta:
            return
        self._text.append(delta)
        self._emit(delta)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.finish_reason, self.error, self.finish_time = reason, error, time.time()
            self._done.set()
        self._emit(END_OF_ANSWER)

    def _emit(self, item) -> None:
        self._deltas.put(item)
        if self._sink is not None:
            try:
                self._sink(item)
            except Exception:  # the reader is gone (e.g. its event loop closed): stop the request, not the engine
                self._sink = None
                self.cancel_requested = True


def fail_request(request: Request, error: BaseException) -> None:
    """End a request that never became a sequence (its input was refused) with `error`."""
    request._finish("error", error if isinstance(error, Exception) else RuntimeError(str(error)))


@dataclass(eq=False)  # a sequence is itself: compared and hashed by identity
class Sequence:
    """What the scheduler keeps for one request: its token ids, images, decoding state and KV blocks."""
    request: Request
    ids: list                 # prompt ids, then generated ids
    prompt_len: int
    pixels: list              # one (3, H, W) tensor per image, in prompt order
    image_spans: list         # [(start, end)) of each image's tokens in ids
    image_keys: list
    params: SamplingParams
    stop: StopRule
    max_new_tokens: int
    generator: torch.Generator | None
    stop_strings: list
    eos: bool = False               # an eos was produced (the decoding step says so): the answer ends
    blocks: list = field(default_factory=list)
    slot: int | None = None         # its row in the scheduler's block table while it holds blocks
    cached: int = 0                 # tokens whose keys/values are in `blocks`
    emitted: str = ""               # text streamed so far
    hit_tokens: int = 0             # prompt tokens found in the prefix cache at admission
    matcher: object = None          # a constraint.ConstraintMatcher where the request has a constraint
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    detokenizer: IncrementalDetokenizer | None = None  # the answer's text so far, made by stream_text

    @functools.cached_property
    def sampling_key(self) -> tuple:
        """Rows with equal keys are sampled in one batched call (same sampling params, stop rule and logprobs)."""
        return (*dataclasses.astuple(self.params), tuple(self.stop.eos), self.stop.pad, self.top_logprobs)

    @property
    def generated(self) -> list:
        return self.ids[self.prompt_len:]

    @property
    def streams_each_step(self) -> bool:
        """Whether each step streams its new text (`stream_text`): someone reads the request's deltas as they come,
        or a stop string may end it (found in the text as it grows). Otherwise its text is decoded once, at its end
        (the scheduler's `retire`): the same answer without a per-step decode nobody reads."""
        return self.request.streaming or bool(self.stop_strings)

    @property
    def cancelled(self) -> bool:
        return self.request.cancel_requested

    def mark_scheduled(self) -> None:
        """Stamp the request's first admission to a batch (a preempted request keeps its first time)."""
        if self.request.scheduled_time is None:
            self.request.scheduled_time = time.time()

    def append_token(self, token: int) -> None:
        """Record one generated token id (the request's counts and first-token time too)."""
        self.ids.append(token)
        self.request.token_ids.append(token)
        if self.request.first_token_time is None:
            self.request.first_token_time = time.time()
        self.request.generated_tokens += 1

    def stream_text(self, tokenizer, final: bool) -> bool:
        """Stream the new part of the decoded answer. Held back while unsure: an incomplete UTF-8 character,
        trailing spaces (the answer is stripped, as `ask` strips it) and a possible start of a stop string.
        True when a stop string appeared (the text is cut before it, as `runtime.base.cut_at_stop` cuts).
        The answer is decoded incrementally (`IncrementalDetokenizer`: each step decodes a few ids, not the whole
        answer); the final call decodes it whole, once, as `ask` does."""
        if self.detokenizer is None:
            self.detokenizer = IncrementalDetokenizer(tokenizer)
        if final:
            decoded = self.detokenizer.final(self.generated)
        else:
            self.detokenizer.update(self.generated)
            decoded = self.detokenizer.text
            if self.stop_strings and self.detokenizer.holding:
                # a stop string may already show in the held-back ids' text (U+FFFD for an incomplete character,
                # as `ask`'s whole decode shows it): the whole decode, for the steps that hold ids back
                whole = tokenizer.decode(self.generated, skip_special_tokens=True)
                if cut_at_stop(whole.lstrip(), self.stop_strings)[1]:
                    decoded = whole
        text, stopped = cut_at_stop(decoded.lstrip(), self.stop_strings)
        final = final or stopped
        if final:
            text = text.rstrip()
        else:
            text = text.rstrip()
            hold = max((len(s) - 1 for s in self.stop_strings), default=0)
            text = text[:len(text) - hold] if hold else text
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.request._push(text[len(self.emitted):])
            self.emitted = text
        return stopped

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """End the request: "stop" | "length" | "cancelled" | "error" (with `error`)."""
        self.request._finish(reason, error)


def sequence_from_request(request: Request, prepared, stop_strings: list, config, device=None,
                          dtype=None) -> Sequence:
    """The scheduler's view of a `gmaivl_rt.runtime.request.PreparedRequest` (generation options already validated
    there, a seed already turned into its `generator` by `Backend.answer_options`): sampling parameters, stop rule,
    stop strings, and each image's token span in the prompt. config: the model's GMAIVLConfig; device, dtype: where
    the runner wants the ids and pixels (None: the CPU, pixels as they are)."""
    options = dict(prepared.generation)
    max_new_tokens = options.pop("max_new_tokens")
    stop = StopRule.from_config(config.text, options.pop("eos_token_id", None), options.pop("pad_token_id", None))
    params = SamplingParams(**{k: options.pop(k) for k in SAMPLING_OPTIONS if k in options})
    constraint = options.pop("constraint", None)
    top_logprobs = options.pop("top_logprobs", 0) if options.pop("logprobs", False) else None
    ids = prepared.input_ids[0].tolist()
    pixels = [] if prepared.pixel_values is None else list(prepared.pixel_values)
    if device is not None:
        pixels = [p.to(device, dtype) for p in pixels]
    spans, positions = [], [i for i, t in enumerate(ids) if t == config.image_token_index]
    start = 0
    for p in pixels:
        count = config.vision.tokens_per_image(p.shape[-2], p.shape[-1])
        spans.append((positions[start], positions[start + count - 1] + 1))
        start += count
    request.prompt_tokens = len(ids)
    request.top_logprobs = top_logprobs
    if constraint is not None:
        request.constraint_complete = False
    return Sequence(request, ids, len(ids), pixels, spans, list(prepared.image_keys), params, stop, max_new_tokens,
                    options.pop("generator", None), list(stop_strings),
                    matcher=None if constraint is None else constraint.matcher(), top_logprobs=top_logprobs)
