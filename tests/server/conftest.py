"""What the server input, security and fuzz tests share: one tiny model and engine per session, and a running
server (real uvicorn on a free loopback port) whose log records are kept for the assertions."""
from __future__ import annotations

import contextlib
import http.client
import json

import pytest


@pytest.fixture(scope="session")
def serving_folder(tiny_model_folder):
    from server_fixtures import TEXTS

    return tiny_model_folder(TEXTS, "serving_model")


@pytest.fixture(scope="session")
def serving_engine(serving_folder):
    pytest.importorskip("fastapi")
    from gmaivl_rt import Engine

    with Engine(serving_folder, backend="torch", max_batch_size=4) as engine:
        yield engine


@contextlib.contextmanager
def running(app):
    """`app` served on a free 127.0.0.1 port; yields the BackgroundServer with `.log` (a LogRecorder of every record
    of the server's loggers while it runs, tracebacks included)."""
    from server_fixtures import LogRecorder

    from gmaivl_rt.server.background import BackgroundServer

    with LogRecorder() as log:
        background = BackgroundServer(app, log_level="info")
        log.__enter__()  # uvicorn's logging set-up replaced the handlers: attach again
        with background as server:
            server.log = log
            yield server


class Connection:
    """One keep-alive HTTP connection (http.client: it never reconnects by itself), so a test sees whether the
    server kept it usable after an answer."""

    def __init__(self, server, headers=None):
        self.connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.socket = None

    def request(self, method: str, path: str, body=None, raw: bytes | None = None):
        """-> (status, headers dict (lower-case names), text). Asserts it went over the same socket as before."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.connection.request(method, path, body=data, headers=self.headers)
        if self.socket is None:
            self.socket = self.connection.sock
        assert self.connection.sock is self.socket, "the connection was not kept: a new socket was opened"
        response = self.connection.getresponse()
        text = response.read().decode("utf-8")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text

    def close(self):
        self.connection.close()


@pytest.fixture(scope="session")
def serve():
    """serve(app) -> context manager of a running server (see `running`)."""
    return running


@pytest.fixture(scope="session")
def keep_alive():
    """keep_alive(server, headers=None) -> a `Connection`."""
    return Connection


