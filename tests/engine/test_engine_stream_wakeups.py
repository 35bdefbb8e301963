"""`Engine.stream` with several streams on one event loop (embedded use, issue 25): an engine step hands a delta to
each of its rows from the scheduler thread; the loop is woken once for them (`engine.loop_deltas.LoopDeltas`, the
server's streams' mechanism), not once per delta. Wake-ups are counted at the loop's `call_soon_threadsafe`, the
only way another thread can wake it."""
from __future__ import annotations

import asyncio
import threading
import time

from gmaivl_rt import Engine

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20
QUESTIONS = ["Describe the image.", "Which plane is shown?", "What modality is this image?", "An axial slice."]
TOKENS = 24
NO_STOP = {"eos_token_id": []}  # every answer runs to TOKENS tokens


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that records each `call_soon_threadsafe` made from a thread other than its own."""

    def __init__(self):
        super().__init__()
        self.wakeups = 0
        self.owner = None

    def call_soon_threadsafe(self, *args, **kwargs):
        if threading.current_thread() is not self.owner:
            self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_several_streams_wake_the_loop_at_most_once_per_engine_step(tiny_model_folder):
    """len(QUESTIONS) streams of TOKENS tokens each, started together on one loop: their answers equal the engine's
    own (`ask`, greedy), and the loop was woken at most once per engine step that ran meanwhile (counted by wrapping
    `Engine._step`), while the streams received many more deltas than that. Then, with the loop's thread held busy
    while the engine answers all of them, every delta of every step reaches the loop in a single wake-up.
    Mutants (seen failing): `Engine.stream` with its old sink, a `call_soon_threadsafe` per delta (65 wake-ups in 25
    steps: the 61 deltas and 4 ends); `Engine._step` posting its deltas outside `one_wakeup_per_loop` (the loop woken
    again within a step: 29, 33, 57, 58, 60 wake-ups in 24-25 steps, failing in 5 of 6 runs; with it 23-24)."""
    folder = tiny_model_folder(TEXTS, "engine_stream_wakeups")
    options = {"max_new_tokens": TOKENS, "do_sample": False, **NO_STOP}
    with Engine(folder, max_batch_size=len(QUESTIONS)) as engine:
        expected = [engine.ask(q, **options) for q in QUESTIONS]
        steps = 0
        step = engine._step

        def counted_step():
            nonlocal steps
            steps += 1
            step()

        engine._step = counted_step  # the scheduler thread calls self._step() each iteration

        async def answers(busy: bool):
            loop.owner = threading.current_thread()
            received = [0]

            async def one(question):
                parts = []
                async for delta in engine.stream(question, **options):
                    parts.append(delta)
                    received[0] += 1
                return "".join(parts)

            tasks = [asyncio.ensure_future(one(q)) for q in QUESTIONS]
            if busy:
                while not all_submitted():  # each stream's first step submits its request
                    await asyncio.sleep(0)
                while engine.stats()["finished"] < finished_before + len(QUESTIONS):
                    time.sleep(0.01)  # the loop's thread held on purpose until the engine has answered every stream
            return await asyncio.gather(*tasks), received[0]

        def all_submitted() -> bool:
            stats = engine.stats()
            return stats["finished"] + stats["running"] + stats["waiting"] >= finished_before + len(QUESTIONS)

        loop = CountingLoop()
        try:
            finished_before = engine.stats()["finished"]
            texts, deltas = loop.run_until_complete(answers(busy=False))
            live_wakeups, live_steps = loop.wakeups, steps
            loop.wakeups = 0
            finished_before = engine.stats()["finished"]
            busy_texts, _ = loop.run_until_complete(answers(busy=True))
            busy_wakeups = loop.wakeups
        finally:
            loop.close()
            engine._step = step
    assert texts == expected and busy_texts == expected
    assert deltas >= 3 * live_steps // 2, (deltas, live_steps)  # precondition: several deltas a step
    assert live_wakeups <= live_steps, f"{live_wakeups} wake-ups for {live_steps} engine steps ({deltas} deltas)"
    assert busy_wakeups == 1, f"{busy_wakeups} wake-ups while the loop was busy for all {len(QUESTIONS)} answers"
    print(f"{live_wakeups} wake-ups in {live_steps} steps ({deltas} deltas); busy: {busy_wakeups}")
