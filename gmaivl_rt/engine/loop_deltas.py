"""An engine request's text deltas handed to an asyncio event loop from the engine's threads (`LoopDeltas`), with
one wake-up of the loop per burst (an engine step's deltas for all its rows), not one per delta. Used by
`Engine.stream` and by the server's streams (`gmaivl_rt.server.generation`)."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref

_held = threading.local()  # .mailboxes: {mailbox: None} to wake when this thread's `one_wakeup_per_loop` ends


@contextlib.contextmanager
def one_wakeup_per_loop():
    """Posts this thread makes inside the block wake each event loop once, when the block ends: the engine posts a
    step's deltas for all its rows inside one. (Without it the loop's thread could run between two rows' posts, the
    scheduler thread giving the interpreter lock up within a step, take the first rows' deltas and be woken again
    in the same step: 29 to 60 wake-ups in 25 steps of 4 streams, tests/engine/test_engine_stream_wakeups.py.)"""
    if getattr(_held, "mailboxes", None) is not None:  # nested: the outer block wakes them
        yield
        return
    _held.mailboxes = {}
    try:
        yield
    finally:
        mailboxes, _held.mailboxes = _held.mailboxes, None
        for mailbox in mailboxes:
            mailbox._wake()


class LoopDeltas:
    """An engine request's deltas delivered to the event loop it was made on (make it on that loop): pass `sink` to
    `Engine.submit`; the engine's threads call it, each item reaches an asyncio queue on the loop (no thread waits
    for a delta, so any number of streams hold no worker thread), through the loop's one `_LoopMailbox`. Once the
    loop is closed the sink raises and the engine drops it and cancels the request. `Engine.stream` and the
    server's streams both take their deltas this way."""

    def __init__(self):
        self._mailbox = _LoopMailbox.of(asyncio.get_running_loop())
        self._queue: asyncio.Queue = asyncio.Queue()

    def sink(self, item) -> None:
        self._mailbox.post(self._queue, item)

    async def get(self):
        """The next delta (str), or `sequence.END_OF_ANSWER`."""
        return await self._queue.get()


class _LoopMailbox:
    """Every stream's deltas for one event loop, handed over in one loop callback per burst: an engine step gives a
    delta to each of its rows (16 with --max-batch-size 16), and a `call_soon_threadsafe` each would write the loop's
    wake-up pipe, wake the loop and contend for the interpreter lock 16 times a step (with 64 streams that flood
    kept the server's page and /health waiting behind it). Here only a post into an empty mailbox wakes the loop (at
    the end of the step, inside `one_wakeup_per_loop`); the callback then delivers all that arrived meanwhile, in
    order."""

    _by_loop: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _by_loop_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []  # (asyncio.Queue, item), in the order posted

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_LoopMailbox":
        with cls._by_loop_lock:
            mailbox = cls._by_loop.get(loop)
            if mailbox is None:
                mailbox = cls._by_loop[loop] = cls(loop)
            return mailbox

    def post(self, queue: asyncio.Queue, item) -> None:
        """From any thread: put `item` on `queue` on the loop's thread. RuntimeError once the loop is closed."""
        if self._loop.is_closed():  # checked on every post: a wake-up already pending would not raise
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, item))
            wake = len(self._items) == 1
        if wake:
            held = getattr(_held, "mailboxes", None)
            if held is None:
                self._loop.call_soon_threadsafe(self._deliver)
            else:
                held[self] = None

    def _wake(self) -> None:
        """A deferred wake-up (`one_wakeup_per_loop`); none once the loop is closed (nothing there takes deltas, and
        the request's next post raises)."""
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
