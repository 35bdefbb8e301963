"""A process's children and whether a process is still the one seen before, read from /proc (Linux): the tests that
kill a parent with SIGKILL and look for survivors."""
from __future__ import annotations

import os


def proc_stat(pid: int):
    """(parent pid, state, start time) of a process from /proc/PID/stat, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def children(pid: int) -> dict:
    """{child pid: its start time} of the live children of `pid`."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat and stat[0] == pid and stat[1] != "Z":
                found[int(name)] = stat[2]
    return found


def alive(pid: int, start: int) -> bool:
    """The process `pid` that started at `start` is still running (not a zombie, not a reused pid)."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z" and stat[2] == start
