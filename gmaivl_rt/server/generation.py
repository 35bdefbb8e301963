"""One engine request as the event loop sees it (`Generation`): its text deltas handed to the loop by the engine's
threads (`LoopDeltas`), so no worker thread waits on a stream; cancellation when the client leaves; the metrics it
records when it ends. Admission (`Admission`: the `max_waiting` ceiling, counted atomically). And whether the engine
is alive at all."""
from __future__ import annotations

import asyncio
import threading
import time

from fastapi import Request

from gmaivl_rt.engine.loop_deltas import LoopDeltas
from gmaivl_rt.engine.sequence import END_OF_ANSWER
from gmaivl_rt.errors import InputError
from gmaivl_rt.server import protocol
from gmaivl_rt.server.metrics import ServerMetrics, current_outcome

END = object()  # what `Generation.next_delta` returns once the answer is complete


class Generation:
    """One engine request seen from the event loop: its text deltas (awaited on the loop from `deltas`, the
    `LoopDeltas` whose sink the request was submitted with), cancellation, and the metrics it records when it ends.
    Times are the server's monotonic clock, from the HTTP request's arrival (image decoding included)."""

    def __init__(self, request, deltas: LoopDeltas, arrival: float, metrics: ServerMetrics):
        self.request, self.arrival, self.metrics = request, arrival, metrics
        self._deltas = deltas
        self.first_token: float | None = None
        self.done = False
        self.text = ""
        self.error: BaseException | None = None  # what the request failed with
        self.cancelled = False  # stopped before its end (client gone, or an error on the HTTP side)
        self.on_end: list = []  # called (no argument) once when it ends, whatever the outcome
        outcome = current_outcome()
        if outcome is not None:  # the HTTP request's outcome is this generation's
            outcome.generation = self

    async def next_delta(self):
        """The next piece of the answer, or `END`. Raises the request's error (InputError, LimitError, ...); a
        CancelledError here (the client left) leaves the request to `cancel`."""
        if self.done:
            return END
        delta = await self._deltas.get()
        now = time.monotonic()
        if delta is END_OF_ANSWER:
            self.done = True
            self.error = getattr(self.request, "error", None)
            self._ended(now)
            if self.error is not None:
                raise self.error
            return END
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

    @property
    def outcome(self) -> str:
        """"success" | "cancelled" | "client_error" (the request's InputError) | "server_error" (any other error)."""
        if self.error is not None:
            return "client_error" if isinstance(self.error, InputError) else "server_error"
        if self.cancelled or not self.done or getattr(self.request, "finish_reason", None) == "cancelled":
            return "cancelled"
        return "success"

    def _ended(self, now: float):
        """Record the request in the metrics, once, whatever its outcome (tokens processed and queue time for all;
        latencies for answers that ended normally)."""
        self.metrics.observe_ended(
            outcome=self.outcome, finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.completion_tokens, arrival=self.arrival, first_token=self.first_token,
            finish=now, scheduled=request_time(self.request, "scheduled"), token_gaps=self._token_gaps())
        for callback in self.on_end:
            callback()

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
            self.done = self.cancelled = True
            self.request.cancel()
            self._ended(time.monotonic())


class Admission:
    """The `max_waiting` ceiling (None: none): requests whose images are being read plus the engine's waiting ones
    (being prepared or queued) never exceed it. Checked and counted under one lock, so a burst cannot all pass a
    count read before any of them was submitted.

        ticket = admission.admit()          # None: saturated (answer 429)
        request = ticket.submit(lambda: engine.submit(...))   # from a worker thread; ticket.release() if abandoned
    """

    def __init__(self, engine, max_waiting: int | None):
        self.engine, self.max_waiting = engine, max_waiting
        self._lock = threading.Lock()
        self._reading = 0  # admitted, images not yet handed to the engine

    def admit(self) -> "_Ticket | None":
        with self._lock:
            if self.max_waiting is not None and \
                    self._reading + int(self.engine.stats().get("waiting", 0)) >= self.max_waiting:
                return None
            self._reading += 1
        return _Ticket(self)

    def _settle(self, submit=None):
        # under the lock, so the engine's waiting count takes the request over without a moment counted twice
        # or not at all
        with self._lock:
            self._reading -= 1
            return submit() if submit is not None else None


class _Ticket:
    """One admitted request's place until the engine has it (`submit`) or it is given up (`release`)."""

    def __init__(self, admission: Admission):
        self._admission, self._held = admission, True

    def submit(self, submit):
        """Call `submit()` (it queues the request in the engine) and give the place up, atomically."""
        if not self._held:
            raise RuntimeError("this admission ticket was already used")
        self._held = False
        return self._admission._settle(submit)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._settle()


def request_time(request, what: str) -> float | None:
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



async def cancel_on_disconnect(http_request: Request, generation: Generation, every_s: float = 0.25):
    """Cancel `generation` when the HTTP client goes away (checked every `every_s` seconds until it is done)."""
    while not generation.done:
        if await http_request.is_disconnected():
            generation.cancel()
            return
        await asyncio.sleep(every_s)


async def begin_answer(generation: Generation) -> tuple[str, object]:
    """(completion id, first delta) of an answer the engine has started: the id goes on the request's outcome (the
    metrics' and audit log's); an error raised before any output cancels the generation and is raised on, to be
    answered with its status code."""
    request_id = protocol.completion_id()
    if (outcome := current_outcome()) is not None:
        outcome.request_id = request_id
    try:
        return request_id, await generation.next_delta()
    except BaseException:
        generation.cancel()
        raise


async def finish_unstreamed(http_request: Request, generation: Generation, first=None) -> None:
    """Wait until a non-streamed answer ends (`first`: a delta already taken, or None), cancelling it when the
    client goes away; the generation is released whatever happens."""
    watcher = asyncio.create_task(cancel_on_disconnect(http_request, generation))
    try:
        delta = first
        while delta is not END:
            delta = await generation.next_delta()
    finally:
        watcher.cancel()
        generation.cancel()

