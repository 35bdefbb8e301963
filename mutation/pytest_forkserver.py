"""A fork server for mutation runs: one test run per mutant, without paying torch/transformers' import each time.

    python mutation/pytest_forkserver.py serve [SOCKET]      # started by mutation/run.sh, stopped by it
    python mutation/pytest_forkserver.py run PYTEST_ARGS...  # the test-command in mutation/*.toml

`serve` imports the heavy third-party modules once (torch, transformers, triton, pydicom, ...) and NEVER gmaivl_rt
or the tests, so each forked child imports the project fresh from disk: it sees the mutant cosmic-ray has just
written. `run` sends its arguments and working directory to the server and exits with the child's pytest exit code;
with no server listening it runs `python -m pytest PYTEST_ARGS...` itself (same result, just slower). The child is
killed when the client goes away (cosmic-ray's timeout) or after MUTATE_TEST_TIMEOUT seconds (default 600).
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import tempfile

DEFAULT_SOCKET = "runs/mutation/pytest.sock"
# Heavy imports shared by the forked test runs; none of them imports gmaivl_rt.
PRELOAD = ["numpy", "torch", "triton", "triton.language", "PIL.Image", "pydicom", "nibabel", "pytest", "hypothesis",
           "transformers"]
PRELOAD_ATTRS = {"transformers": ["LlavaForConditionalGeneration", "LlavaConfig", "CLIPVisionConfig", "LlamaConfig",
                                  "LlamaForCausalLM", "CLIPVisionModel"]}


def _preload() -> None:
    # As tests/conftest.py: the interpreter switch must be set before triton is first imported.
    for key, value in (("TRITON_INTERPRET", "1"), ("TRITON_DEFAULT_FP_FUSION", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    import importlib

    for name in PRELOAD:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in PRELOAD_ATTRS.get(name, []):
            getattr(module, attr, None)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("gmaivl_rt", "kernels", "train", "export"))
    if leaked:  # a child would then test the module as it was when the server started, not the mutant
        raise SystemExit(f"pytest_forkserver: preloading imported project modules {leaked[:3]}")


def _run_child(request: dict, log_fd: int) -> None:
    """In the forked child: run pytest as `python -m pytest` would in request['cwd']; never returns."""
    code = 3
    try:
        os.setpgid(0, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.chdir(request["cwd"])
        sys.path.insert(0, request["cwd"])  # what `python -m` puts first
        sys.dont_write_bytecode = True  # no .pyc of a mutant left behind for a later run to pick up
        import pytest

        code = int(pytest.main(request["args"]))
    except BaseException as e:  # noqa: BLE001 - report any failure as a failed run
        print(f"pytest_forkserver child: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve_one(conn: socket.socket, timeout: float) -> None:
    request = json.loads(conn.makefile("r").readline())
    with tempfile.TemporaryFile() as log:
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_child(request, log.fileno())
        status, waited = None, 0.0
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
                break
            readable, _, _ = select.select([conn], [], [], 0.1)
            waited += 0.1
            if (readable and not conn.recv(1, socket.MSG_PEEK)) or waited > timeout:
                os.killpg(pid, signal.SIGKILL)  # client gone (cosmic-ray timed out) or our own bound
                os.waitpid(pid, 0)
                return
        log.seek(0)
        tail = log.read()[-4000:].decode(errors="replace")
    try:
        conn.sendall(json.dumps({"code": status, "output": tail}).encode() + b"\n")
    except OSError:
        pass


def serve(path: str) -> None:
    _preload()
    if os.path.exists(path):
        os.unlink(path)
    timeout = float(os.environ.get("MUTATE_TEST_TIMEOUT", "600"))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print(f"pytest_forkserver: ready on {path}", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                _serve_one(conn, timeout)
            except (OSError, ValueError) as e:
                print(f"pytest_forkserver: request failed: {e}", flush=True)


def run(args: list[str]) -> int:
    path = os.environ.get("PYTEST_FORKSERVER", DEFAULT_SOCKET)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        os.execvp(sys.executable, [sys.executable, "-m", "pytest", *args])
    client.sendall(json.dumps({"cwd": os.getcwd(), "args": args}).encode() + b"\n")
    reply = json.loads(client.makefile("r").readline() or '{"code": 3, "output": "server gave no answer"}')
    sys.stdout.write(reply["output"])
    return reply["code"]


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        serve(sys.argv[2] if len(sys.argv) > 2 else DEFAULT_SOCKET)
    elif len(sys.argv) >= 2 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2:]))
    else:
        sys.exit(__doc__)
