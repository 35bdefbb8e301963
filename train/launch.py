"""One training stage on several processes of this machine: data-parallel ranks (DDP over gloo on CPU, one thread
each), each a `gmaivl-rt train` child with the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT on a free loopback port).

On the demo's two cores a step of 2 x 768 tokens took about 0.26 s on two ranks against 0.41-0.47 s in one
one-thread process (2026-12-07, a loaded machine): a small model's matrix products split poorly over intra-op
threads, whole batches split well over ranks. The children end with this process, however it ends;
the first that fails stops the others (rank 0 writes on this process's stderr; another rank's last lines are in
the error).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gmaivl_rt.errors import GmaivlError
from gmaivl_rt.processes import ends_with_parent, free_port


class LaunchError(GmaivlError):
    """A rank of a local multi-process training run failed."""


def train_on_local_ranks(processes: int, stage: int, data, out, *, config=None, preset: str | None = None,
                         init=None, tokenizer=None, max_steps: int | None = None, progress: bool = True,
                         timeout_s: float | None = None) -> dict:
    """`recipe.train(stage, data, out, ...)` on `processes` local ranks. Returns {"out", "stage", "steps",
    "total_steps", "final_loss", "losses"} (rank 0's result and OUT/log.jsonl). processes: 1 runs `train` in this
    process. timeout_s: the ranks are killed past it (LaunchError)."""
    from .recipe import train

    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a whole number >= 1, got {processes!r}")
    if processes == 1:
        return train(stage, data, out, config=config, preset=preset, init=init, tokenizer=tokenizer,
                     max_steps=max_steps, progress=progress)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "gmaivl_rt.cli", "train", "--stage", str(stage), "--data",
               str(Path(data).resolve()), "--out", str(out)]
    for flag, value in (("--config", config), ("--init", init), ("--tokenizer", tokenizer)):
        if value is not None:
            command += [flag, str(Path(value).resolve())]
    command += (["--preset", preset] if preset else []) + (["--max-steps", str(max_steps)] if max_steps else [])
    port = free_port()
    children = []
    with tempfile.TemporaryDirectory(prefix="gmaivl-ranks-") as logs:
        for rank in range(processes):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            quiet = rank > 0 or not progress
            # rank 0 speaks on this process's stderr (its log lines and progress bar), the others into files;
            # rank 0's result line (stdout) is read back below
            stderr = open(Path(logs) / f"rank{rank}.log", "wb") if rank > 0 else None
            stdout = open(Path(logs) / "result.json", "wb") if rank == 0 else subprocess.DEVNULL
            # cwd: a neutral folder, so the checkout's top-level folders never shadow an installed package
            children.append((subprocess.Popen(command + (["--no-progress"] if quiet else []), env=env,
                                              cwd=logs, stdout=stdout, stderr=stderr, **ends_with_parent()),
                             stderr))
            if rank == 0:
                stdout.close()  # the child holds its own copy
        failed = _wait(children, timeout_s)
        for _, stderr in children:
            if stderr is not None:
                stderr.close()
        if failed is not None:
            rank, code = failed
            said = "its output is above" if rank == 0 else "\n".join(
                (Path(logs) / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-12:])
            raise LaunchError(f"stage {stage}: rank {rank} of {processes} exited with code {code}; {said}")
        lines = (Path(logs) / "result.json").read_text().strip().splitlines()
        result = json.loads(lines[-1]) if lines else {}
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return {"out": str(out), "stage": stage, "steps": len(losses), "total_steps": result.get("total_steps"),
            "final_loss": losses[-1] if losses else None, "losses": losses}


def _wait(children, timeout_s: float | None) -> tuple[int, int] | None:
    """Wait for every child; on the first non-zero exit (or the timeout) kill the rest. Returns (rank, code) of
    the first failure, else None."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.poll() for p, _ in children]
            bad = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if bad is not None:
                return bad
            if all(c == 0 for c in codes):
                return None
            if deadline is not None and time.monotonic() > deadline:
                return next(r for r, c in enumerate(codes) if c is None), -9
            time.sleep(0.2)
    finally:
        for p, _ in children:
            if p.poll() is None:
                p.kill()
                p.wait()
