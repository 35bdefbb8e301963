"""How this package runs uvicorn: the one set of server settings (`uvicorn_config`) that `gmaivl-rt serve`
(`serve_until_stopped`, in the foreground) and `BackgroundServer` (a thread, for tests and notebooks) both use.

Stopping is bounded: on SIGTERM / SIGINT (or `should_exit`) uvicorn stops accepting, lets the open requests run for
`timeout_graceful_shutdown` seconds, then cancels them; a cancelled stream ends with a 503 error event and
`data: [DONE]` (`sse.sse_events`, `middleware.InternalErrors`), its engine request is cancelled. Without that
bound uvicorn waits for every open stream to reach its end: `serve` did not exit 30 s after SIGTERM with long
answers streaming (issue 25).
"""
from __future__ import annotations

import signal

# Seconds an idle keep-alive connection is kept open. Longer than clients keep theirs (httpx, and so the official
# openai client, drop an idle connection after 5 s; uvicorn's own default is also 5 s): the client always gives a
# connection up first. Were the server first, a client could send its next request on a connection the server is
# closing at that moment, and get "connection reset by peer" before the request reaches the app (the soak's 2 lost
# requests in 3405; reproduced with uvicorn and httpx, docs/serving.md).
KEEP_ALIVE_S = 15
# Seconds open requests may go on after the server is told to stop, before they are cancelled. Short: an answer
# cut by a restart is retried by its client, while a deployment's stop (systemd, docker: 10 s before SIGKILL) must
# not be outwaited.
GRACEFUL_SHUTDOWN_S = 5


def check_timeouts(timeout_keep_alive: int, timeout_graceful_shutdown: float) -> None:
    """InputError (naming the flag) for a keep-alive under 1 s (connections closed under clients that still count
    on them) or a negative grace period; `serve` checks before it loads the model, `uvicorn_config` always."""
    from gmaivl_rt.errors import InputError

    if timeout_keep_alive < 1:
        raise InputError(f"--timeout-keep-alive must be at least 1 second, not {timeout_keep_alive}")
    if timeout_graceful_shutdown < 0:
        raise InputError(f"--timeout-graceful-shutdown must be 0 or more seconds, not {timeout_graceful_shutdown}")


def uvicorn_config(app, host: str, port: int, *, log_level: str = "info", lifespan: str = "auto",
                   timeout_keep_alive: int = KEEP_ALIVE_S, timeout_graceful_shutdown: float = GRACEFUL_SHUTDOWN_S):
    """The `uvicorn.Config` every server of this package runs with (`check_timeouts` first)."""
    import uvicorn

    check_timeouts(timeout_keep_alive, timeout_graceful_shutdown)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan=lifespan,
                          timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=timeout_graceful_shutdown)


def serve_until_stopped(config) -> None:
    """Serve `config` (from `uvicorn_config`) in this, the main, thread until SIGTERM or SIGINT, and return.

    uvicorn handles the signal (graceful stop, bounded by the config), then raises it again once it is done, to the
    handler that was installed before it started: the default one would kill the process there (exit -15, the
    engine never closed). Here that handler only asks the server to stop (what a signal before uvicorn took over
    must still do), so the caller goes on to close its engine and exits 0: a stop asked for is a success."""
    import uvicorn

    server = uvicorn.Server(config)

    def stop(signum, frame):
        server.should_exit = True

    stopping = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, stop) for signum in stopping}
    try:
        server.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
