"""Run an ASGI app with uvicorn in a background thread on a free loopback port (tests, benchmarks, notebooks).

    with BackgroundServer(create_app(engine)) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
"""
from __future__ import annotations

import threading
import time

from gmaivl_rt.processes import free_port  # noqa: F401 - re-exported: tests and benches take it from here

# Seconds an idle keep-alive connection is kept open. Longer than clients keep theirs (httpx, and so the official
# openai client, drop an idle connection after 5 s; uvicorn's own default is also 5 s): the client always gives a
# connection up first. Were the server first, a client could send its next request on a connection the server is
# closing at that moment, and get "connection reset by peer" before the request reaches the app (the soak's 2 lost
# requests in 3405; reproduced with uvicorn and httpx, docs/serving.md).
KEEP_ALIVE_S = 15


class BackgroundServer:
    """uvicorn serving `app` on `host` (loopback by default) in a daemon thread; stops on exit, bounded in time."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 30.0,
                 stop_timeout_s: float = 30.0, log_level: str = "warning", timeout_keep_alive: int = KEEP_ALIVE_S):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level, lifespan="off",
                                timeout_graceful_shutdown=int(stop_timeout_s), timeout_keep_alive=timeout_keep_alive)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError(f"the server did not start on {self.url} within {self.start_timeout_s} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.stop_timeout_s)
        if self.thread.is_alive():  # open streams past the grace period: close them
            self.server.force_exit = True
            self.thread.join(5.0)
