"""Test-wide set-up. The Triton interpreter must be switched on before triton is first imported."""
import os
import signal
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton kernels (interpreted on CPU) for the duration of a test."""
    monkeypatch.setenv("GMAIVL_KERNELS", "triton")


@pytest.fixture
def torch_path(monkeypatch):
    """Force the PyTorch references for the duration of a test."""
    monkeypatch.setenv("GMAIVL_KERNELS", "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CLI = [sys.executable, "-m", "gmaivl_rt.cli"]


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """A command a test starts and later kills or waits for (`python -m gmaivl_rt.cli ...` by default). Its stderr
    goes to a file, so a child that died before the test was done with it is reported by its exit code and the tail
    of its stderr (`why()`), not by whatever the test tried next (`os.kill` of a dead pid, a missing file)."""

    def __init__(self, args, *, stderr_file, command=CLI, **popen):
        self.stderr_file = stderr_file
        self._stderr = open(stderr_file, "w")
        popen.setdefault("stdout", subprocess.DEVNULL)
        self.process = subprocess.Popen([*command, *map(str, args)], stderr=self._stderr, **popen)
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def why(self) -> str:
        self._stderr.flush()
        return (f"the child exited with code {self.process.poll()}; its stderr ends with:\n"
                f"{tail(open(self.stderr_file).read())}")

    def kill(self, group: bool = False) -> None:
        """SIGKILL the child (its process group with `group`), failing with `why()` if it was already dead."""
        assert self.alive(), self.why()
        (os.killpg if group else os.kill)(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(timeout=30)
        self._stderr.close()


@pytest.fixture
def start_child(tmp_path_factory):
    """start_child(args, **popen) -> Child; every child still running at the end of the test is killed."""
    children = []

    def start(args, **popen):
        log = tmp_path_factory.mktemp("child") / "stderr.txt"
        children.append(Child(args, stderr_file=log, **popen))
        return children[-1]

    yield start
    for child in children:
        child.close()


def run_cli(args, *, expect: int | None = 0, **kwargs) -> subprocess.CompletedProcess:
    """`python -m gmaivl_rt.cli ARGS` to the end; with `expect`, a different exit code fails the test with the
    tail of the child's stderr."""
    kwargs.setdefault("timeout", 600)
    run = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kwargs)
    if expect is not None:
        assert run.returncode == expect, f"exit code {run.returncode}; stderr ends with:\n{tail(run.stderr)}"
    return run


@pytest.fixture
def cli():
    """The `run_cli` function, for tests that run the CLI in a child process."""
    return run_cli
