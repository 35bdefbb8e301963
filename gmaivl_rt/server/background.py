"""Run an ASGI app with uvicorn in a background thread on a free loopback port (tests, benchmarks, notebooks).

    with BackgroundServer(create_app(engine)) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
"""
from __future__ import annotations

import threading
import time

from gmaivl_rt.processes import free_port  # noqa: F401 - re-exported: tests and benches take it from here
from gmaivl_rt.server.hosting import GRACEFUL_SHUTDOWN_S, KEEP_ALIVE_S, uvicorn_config

class BackgroundServer:
    """uvicorn serving `app` on `host` (loopback by default) in a daemon thread, with the settings `gmaivl-rt serve`
    uses (`hosting.uvicorn_config`); stops on exit, bounded in time: open requests get `stop_timeout_s` seconds
    (uvicorn's graceful period), then are cancelled. lifespan "off", as always here: the app's shutdown hooks (its
    decode pool's close) do not run, so the app may be served again."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 30.0,
                 stop_timeout_s: float = GRACEFUL_SHUTDOWN_S, log_level: str = "warning",
                 timeout_keep_alive: int = KEEP_ALIVE_S):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port, log_level=log_level, lifespan="off",
                                                    timeout_keep_alive=timeout_keep_alive,
                                                    timeout_graceful_shutdown=stop_timeout_s))
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
        self.thread.join(self.stop_timeout_s + 10.0)  # the grace period, then the cancelled requests' ends
        if self.thread.is_alive():  # still not done: close what is open
            self.server.force_exit = True
            self.thread.join(5.0)
