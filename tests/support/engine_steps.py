"""Holding an engine's requests in flight: each step made slower, so requests overlap the ones a test sends."""
import time


def slow_steps(engine, seconds: float):
    """Each engine step takes at least `seconds` from now on; returns the runner's own `run` (to restore or call)."""
    run = engine.runner.run

    def slow(batch):
        time.sleep(seconds)
        return run(batch)

    engine.runner.run = slow
    return run
