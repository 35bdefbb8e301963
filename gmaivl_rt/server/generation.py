"""One engine request as the event loop sees it (`Generation`): its text deltas read in a worker thread, so the
loop never blocks; cancellation when the client leaves; the metrics it records when it ends. And whether the engine
is alive at all."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from gmaivl_rt.server.metrics import ServerMetrics

END = object()  # what `Generation.next_delta` returns once the answer is complete


class Generation:
    """One engine request seen from the event loop: its text deltas (read in a worker thread, so the loop never
    blocks), cancellation, and the metrics it records when it ends. Times are the server's monotonic clock, from the
    HTTP request's arrival (image decoding included)."""

    def __init__(self, request, arrival: float, metrics: ServerMetrics):
        self.request, self.arrival, self.metrics = request, arrival, metrics
        self._iterator = iter(request)
        self.first_token: float | None = None
        self.done = False
        self.text = ""

    async def next_delta(self):
        """The next piece of the answer, or `END`. Raises the request's error (InputError, LimitError, ...)."""
        if self.done:
            return END
        try:
            delta = await run_in_threadpool(next, self._iterator, END)
        except Exception:  # the request failed (ended); a CancelledError here is the client leaving: cancel() follows
            self.done = True
            raise
        now = time.monotonic()
        if delta is END:
            self.done = True
            self._finished(now)
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

    def _finished(self, now: float):
        self.metrics.observe_finished(
            finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
            generated_tokens=self.completion_tokens, arrival=self.arrival, first_token=self.first_token,
            finish=now, scheduled=request_time(self.request, "scheduled"), token_gaps=self._token_gaps())

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
            self.done = True
            self.request.cancel()


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

