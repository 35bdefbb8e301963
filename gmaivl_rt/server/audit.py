"""`--audit-log FILE`: one JSON line per request to /v1/*, for whoever must later answer "who asked what, when".

A line holds only closed-vocabulary or numeric fields and content digests: the time (UTC, ISO-8601), a request id,
the client address, the endpoint, the outcome (`metrics.RequestOutcome`'s rule, the one
`gmaivl:requests_total{outcome}` counts by), the HTTP status, token counts, the image count and the SHA-256 of each
image's bytes as received. Never text, a header value, a file name or a URL: those can name a patient.

Each line is one `os.write` on a descriptor opened per line in append mode (O_APPEND: the kernel places each write
whole at the end, so concurrent requests never interleave, and a removed or rotated file is created again), mode
0600. A write that fails (disk full, a read-only folder) never fails the request: one warning names the problem.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import uuid
from datetime import datetime, timezone

from gmaivl_rt.errors import InputError

log = logging.getLogger("gmaivl_rt.server")

# Endpoints are logged by name only when they are the server's own routes: any other path could carry text.
AUDITED_ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/v1/gmaivl/preview",
                     "/v1/gmaivl/archive/chat/completions", "/v1/gmaivl/archive/studies", "/v1/gmaivl/archive/series")
OTHER_ENDPOINT = "/v1/(other)"
FILE_MODE = 0o600


class AuditLog:
    """Appends audit lines to `path` (str or PathLike). Creating it checks at once that the file can be written
    (InputError otherwise), so a bad --audit-log stops the server's start, not its first request."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock = threading.Lock()  # one line at a time, even from worker threads
        self._failing = False
        try:
            os.close(self._open())
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else type(error).__name__
            raise InputError(f"--audit-log cannot be opened for appending ({reason})") from None

    @staticmethod
    def covers(path: str) -> bool:
        """Whether a request to `path` gets a line: every /v1 path."""
        return path == "/v1" or path.startswith("/v1/")

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # an existing file too (never a device such as /dev/null)
                os.fchmod(fd, FILE_MODE)
        except OSError:
            os.close(fd)
            raise
        return fd

    def record(self, scope, outcome: str, request) -> None:
        """Write the line of one finished HTTP request: `scope` its ASGI scope, `outcome` one of `metrics.OUTCOMES`,
        `request` its `metrics.RequestOutcome` (status, generation, request id, image count and digests)."""
        self.write(audit_line(scope, outcome, request))

    def write(self, line: dict) -> None:
        data = (json.dumps(line, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")
        with self._lock:
            try:
                fd = self._open()
                try:
                    written = os.write(fd, data)
                finally:
                    os.close(fd)
                if written != len(data):
                    raise OSError(0, "short write")
            except OSError as error:
                if not self._failing:  # once per failing spell, naming the problem, never the line
                    reason = os.strerror(error.errno) if error.errno else (error.strerror or type(error).__name__)
                    log.warning("audit log: a line could not be written (%s); requests go on, unlogged", reason)
                self._failing = True
                return
            if self._failing:
                log.warning("audit log: writing again")
            self._failing = False


def audit_line(scope, outcome: str, request) -> dict:
    """The audit line (a JSON-ready dict) of one request; see the module doc for what it may hold."""
    path = scope.get("path", "")
    client = scope.get("client")
    generation = request.generation
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request.request_id or f"req-{uuid.uuid4().hex}",
        "client": client[0] if client else None,
        "endpoint": path if path in AUDITED_ENDPOINTS else OTHER_ENDPOINT,
        "outcome": outcome,
        "status": request.status,
        "prompt_tokens": generation.prompt_tokens if generation is not None else 0,
        "completion_tokens": generation.completion_tokens if generation is not None else 0,
        "images": request.image_count,
        "image_sha256": list(request.image_digests),
    }
