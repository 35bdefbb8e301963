"""Worker processes end when their parent ends, however it ends (kill -9 included): the one rule every pool worker
and child process of gmaivl-rt follows.

* `end_with_parent(parent_pid)`: called first thing in a worker (a multiprocessing pool's initializer): Linux arms
  `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so the kernel kills the worker when its parent thread ends; elsewhere a
  watchdog thread polls the parent. A parent already gone (the race the signal cannot cover) ends the worker at once.
* `ends_with_parent()`: keyword arguments for `subprocess.run` / `Popen` that arm the same signal in the child
  before it runs its program (it survives `exec`), so a child command ends with the process that started it.
  Elsewhere (no prctl) it is empty: such a child is left to finish by itself.
* `ordered_map(fn, tasks, workers)`: fn over tasks in a pool of forked workers that follow the first rule, the
  results in task order.

Without it a child outlives a killed parent: a pool worker blocked forever on a task pipe whose write end it holds
itself, a TensorRT plugin compile or a GPU check running on with nobody to read its answer.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _arm_death_signal(prctl) -> bool:
    try:
        return prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError, ctypes.ArgumentError):
        return False


def end_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid` (the process that started it) ends: SIGKILL from the kernel on Linux,
    a watchdog thread polling the parent elsewhere; if the parent is already gone, exit (code 1) at once."""
    prctl = _prctl()
    armed = prctl is not None and _arm_death_signal(prctl)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="gmaivl-parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every_s)
    os._exit(1)


def ends_with_parent() -> dict:
    """`subprocess.run(cmd, **ends_with_parent())`: the child gets SIGKILL when this process ends (Linux; armed in the
    child between fork and exec, the C library's prctl looked up here first so the child calls nothing but it and
    getppid). A child whose parent died before the signal was armed exits (code 1) before running its program. An
    empty dict where prctl does not exist. The kernel ties the signal to the thread that started the child: use it
    with `subprocess.run`, or a `Popen` the same thread waits for."""
    prctl = _prctl()
    if prctl is None:
        return {}
    parent_pid = os.getpid()

    def arm():  # runs in the child, between fork and exec: only async-signal-safe work
        _arm_death_signal(prctl)
        if os.getppid() != parent_pid:
            os._exit(1)

    return {"preexec_fn": arm}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS's pick), for a server or a process group's rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ordered_map(fn, tasks: list, workers: int) -> Iterator:
    """fn(task) for each task, yielded in task order: in `workers` forked processes that end with this one (kill -9
    included), or in this process when workers <= 1 or there is one task. fn must be a module-level function whose
    work needs no state set up after the fork beyond what the parent holds (numpy, file I/O: not torch's threads)."""
    if workers <= 1 or len(tasks) < 2:
        yield from map(fn, tasks)
        return
    import concurrent.futures
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context(method),
                                                initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.map(fn, tasks)
