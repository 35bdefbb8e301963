"""Child processes end with their parent (issue 25 item 11, the remaining subprocesses): the TensorRT plugin's compile
child (`runtime/trt_plugin.py`, under the Triton interpreter), the GPU check's re-run without the interpreter
(`gpu_check --smoke`) and the training ranks of `train --processes` / the demo (`train.launch`). Each parent runs the real function with `sys.executable` pointing at a stand-in that stays
alive (`exec sleep`), is killed with SIGKILL, and no child may be alive 5 s later. Processes are read from /proc."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from proc_children import alive, children

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"),
                                reason="reads processes from /proc; the death signal is Linux's prctl")

PARENTS = {
    "trt_plugin compile": "import sys; import gmaivl_rt.runtime.trt_plugin as plugin; sys.executable = sys.argv[1]; "
                          "plugin._compile_in_child('fp16', 64, True, None, 80)",
    "gpu_check --smoke": "import sys; from gmaivl_rt.gpu_check.run import main; sys.executable = sys.argv[1]; "
                         "main(['--out', sys.argv[2], '--smoke'])",
    "train --processes 2": "import sys; from gmaivl_rt.train.launch import train_on_local_ranks; "
                           "sys.executable = sys.argv[1]; train_on_local_ranks(2, 3, 'data', sys.argv[2])",
}


def _kill_and_count_survivors(parent: subprocess.Popen, timeout_s: float = 120) -> tuple[dict, list]:
    """Wait for `parent`'s child, SIGKILL the parent alone, then -> (children seen, those alive 5 s later)."""
    found, deadline = {}, time.monotonic() + timeout_s
    while not found and time.monotonic() < deadline and parent.poll() is None:
        found = children(parent.pid)
        time.sleep(0.05)
    assert found, f"no child appeared (parent exit code {parent.poll()}): {parent.stderr.read() if parent.stderr else ''}"
    time.sleep(0.5)  # the child is past its fork and exec
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(30)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p, s) for p, s in found.items()):
        time.sleep(0.05)
    return found, [p for p, s in found.items() if alive(p, s)]


@pytest.mark.parametrize("which", sorted(PARENTS))
def test_sigkill_of_the_parent_ends_its_child(which, tmp_path):
    """Mutant: `**ends_with_parent()` removed from the call site (trt_plugin's `_compile_in_child`, gpu_check's
    `main`, train.launch's rank Popen): the child (`sleep 600`) is still alive 5 s after its parent was killed."""
    stand_in = tmp_path / "python-stand-in"
    stand_in.write_text("#!/bin/sh\nexec sleep 600\n")
    stand_in.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if which == "trt_plugin compile":
        env["TRITON_INTERPRET"] = "1"  # the compile moves to a child only under the interpreter
    pytest.importorskip("triton")
    parent = subprocess.Popen([sys.executable, "-c", PARENTS[which], str(stand_in), str(tmp_path / "out")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = {}
    try:
        found, survivors = _kill_and_count_survivors(parent)
        assert not survivors, f"children still alive 5 s after their parent was killed: {survivors}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid, start in found.items():  # never leave one behind, whatever the outcome
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_does_not_run_its_program(tmp_path):
    """`ends_with_parent()`'s race: the parent dies between fork and the signal being armed. The child, told its
    parent is a process that is not its parent, exits with code 1 before running its program.
    Mutant: the `os.getppid() != parent_pid` check removed from the child's `arm`: the program runs and prints."""
    code = ("import os, subprocess, gmaivl_rt.processes as p; os.getpid = lambda: 1; "
            "print(subprocess.run(['echo', 'ran'], capture_output=True, text=True, **p.ends_with_parent()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "SubprocessError" in run.stderr or "returncode=1" in run.stdout, (run.stdout, run.stderr)
    assert "stdout='ran" not in run.stdout
