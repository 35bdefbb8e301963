"""Pool workers end with their parent: `kill -9` of a running `gmaivl-rt data build --workers 2` (the parent alone,
not its process group) leaves no worker alive a few seconds later (the report found both still alive after 13
minutes, blocked on a task pipe whose write end they held themselves). Processes are read from /proc."""
import os
import sys
import time

import pytest
from manifest_sources import make_sources
from proc_children import alive as _alive
from proc_children import children as _children

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")

SLOW_REWRITER = '''
import time


def rewrite(text, context):
    time.sleep(0.15)
    return text + " (checked)"
'''


def _kill_mid_run_and_expect_workers_to_end(child, progress_dir) -> None:
    """Wait until `child` has two pool workers and a file under progress_dir, SIGKILL `child` alone (its workers
    are left to notice by themselves) and assert every worker is gone within 5 s; none is left behind either way."""
    workers: dict = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.alive():
        workers = _children(child.pid)
        done = sum(len(files) for _, _, files in os.walk(progress_dir)) if progress_dir.exists() else 0
        if len(workers) >= 2 and done >= 1:
            break
        time.sleep(0.05)
    assert len(workers) >= 2, child.why() if not child.alive() else f"workers seen: {workers}"
    child.kill()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in workers.items()):
            time.sleep(0.05)
        survivors = [p for p, s in workers.items() if _alive(p, s)]
        assert not survivors, f"workers still alive 5 s after their parent was killed: {survivors}"
    finally:
        for pid, start in workers.items():  # never leave one behind, whatever the outcome
            if _alive(pid, start):
                os.kill(pid, 9)


def test_sigkill_of_a_parallel_build_leaves_no_worker_alive(tmp_path, start_child):
    """Mutant: the workers' `end_with_parent` call removed from `_init_worker`: both workers survive the parent."""
    manifest, _ = make_sources(tmp_path / "sources")
    (tmp_path / "slowrw.py").write_text(SLOW_REWRITER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "out"
    build = start_child(["data", "build", "--manifest", manifest, "--out", out, "--seed", "3", "--rewriter",
                         "slowrw:rewrite", "--workers", "2", "--no-progress"], env=env)
    _kill_mid_run_and_expect_workers_to_end(build, out / ".work")
    assert not (out / "summary.json").exists()  # it was killed mid-build, not after


def test_a_worker_whose_parent_is_already_gone_ends_at_once(tmp_path):
    """The race the kernel signal cannot cover: the parent dies before the worker armed it. A process told its
    parent is one that is not its parent ends with exit code 1 instead of serving.
    Mutant: the `os.getppid() != parent_pid` check removed: it prints 'served' and exits 0."""
    import subprocess

    code = "from gmaivl_rt.processes import end_with_parent; end_with_parent(1); print('served')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "served" not in run.stdout


def test_sigkill_of_data_synth_leaves_no_rendering_worker_alive(tmp_path, start_child):
    """`data synth --workers 2` renders its scans in `processes.ordered_map`'s pool, which the vision pretraining's
    pictures share: killed with SIGKILL mid-run, its workers end within seconds.
    Mutant: `ordered_map` without its `end_with_parent` initializer: both workers outlive the parent."""
    out = tmp_path / "synth"
    synth = start_child(["data", "synth", "--out", out, "--count", "3000", "--workers", "2", "--no-progress"])
    _kill_mid_run_and_expect_workers_to_end(synth, out / "files")
    assert not (out / "manifest.yaml").exists()  # killed mid-run, not after
